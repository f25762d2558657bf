"""The generator's Prometheus metrics after real requests through the engine and its scheduler
(read in-process from prometheus_client's REGISTRY): token counts, latencies, the queue gauges,
the bank cache, and the attention mass on memories checked against the numpy model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.generator.request_types import GenerationRequest, MemoryOptions, Sampling

from .helpers import run
from .memory_helpers import assert_decidable, ref_memory

SHARE = "extmind_generator_memory_attention_share"
BY_LAYER = "extmind_generator_memory_attention_share_by_layer"


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Delta:
    """Sample values now minus at construction."""

    def __init__(self, *keys):
        self.before = {k: sample(k[0], **dict(k[1:])) for k in keys}

    def __call__(self, name: str, **labels) -> float:
        key = (name, *sorted(labels.items()))
        return sample(name, **labels) - self.before[key]


def key(name: str, **labels) -> tuple:
    return (name, *sorted(labels.items()))


async def test_tokens_latencies_and_gauges_of_a_plain_request(engine):
    prompt = engine.tokenizer.encode("Water boils at")
    d = Delta(
        key("extmind_generator_prompt_tokens_total"),
        key("extmind_generator_generated_tokens_total"),
        key("extmind_generator_time_to_first_token_seconds_count"),
        key("extmind_generator_request_seconds_count", finish_reason="length"),
        key("extmind_generator_request_seconds_sum", finish_reason="length"),
        key(SHARE + "_count"),
    )
    _, _, _, final = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=5)))
    assert final.finish_reason == "length" and final.completion_tokens == 5
    assert d("extmind_generator_prompt_tokens_total") == len(prompt)
    assert d("extmind_generator_generated_tokens_total") == 5
    assert d("extmind_generator_time_to_first_token_seconds_count") == 1
    assert d("extmind_generator_request_seconds_count", finish_reason="length") == 1
    assert d("extmind_generator_request_seconds_sum", finish_reason="length") > 0
    assert d(SHARE + "_count") == 0  # no memories: nothing measured
    assert sample("extmind_generator_waiting_requests") == 0 and sample("extmind_generator_running_requests") == 0


async def test_running_and_waiting_gauges_follow_the_batch(engine):
    """While requests decode, the running gauge counts them; when all ended, both are 0."""
    # The engine is shared with earlier tests: let any request they left (a cancelled stream is
    # only dropped at its next step) finish first, so the gauges count this test's requests alone.
    for _ in range(500):
        if sample("extmind_generator_waiting_requests") == 0 and sample("extmind_generator_running_requests") == 0:
            break
        await asyncio.sleep(0.01)
    seen = []

    async def watch():
        # The MLX thread moves the gauges while this reads them: read running first. A request's
        # first token moves one from waiting to running, so reading waiting first could count it
        # twice (seen on a GPU); in this order a read between two moves can only undercount.
        while True:
            running = sample("extmind_generator_running_requests")
            seen.append((sample("extmind_generator_waiting_requests"), running))
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    reqs = [GenerationRequest(engine.tokenizer.encode(p), Sampling(max_tokens=40)) for p in ("A b", "C d e", "F")]
    await asyncio.gather(*(run(engine, r) for r in reqs))
    watcher.cancel()
    assert max(r for _, r in seen) >= 2, seen[-20:]  # several sequences decoded together
    assert all(w + r <= 3 for w, r in seen)
    assert sample("extmind_generator_waiting_requests") == 0 and sample("extmind_generator_running_requests") == 0


@pytest.mark.parametrize(
    "mode,top_k,threshold,layers", [("local", 3, None, None), ("local", 20, 0.05, None), ("remote", 5, None, (1,))]
)
async def test_attention_mass_equals_the_numpy_softmax_share(engine, memory, ref, mode, top_k, threshold, layers):
    """The per-request mean share of attention on the memories, reduced on the device, equals the
    numpy model's softmax weight on the memories, averaged over the same steps, layers and heads."""
    mid, tokens = memory
    bank, _ = ref_memory(ref, tokens, engine.special_ids)
    prompt = engine.tokenizer.encode("Alice met Bob at")
    n = 6
    applied = list(layers) if layers else list(range(engine.num_layers))
    d = Delta(
        key(SHARE + "_count"),
        key(SHARE + "_sum"),
        *(key(BY_LAYER + s, layer=str(i)) for i in range(engine.num_layers) for s in ("_count", "_sum")),
    )
    opts = MemoryOptions((mid,), top_k=top_k, threshold=threshold, mode=mode, layers=layers or ())
    got, _, _, final = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=n), opts))
    shares, margins = {}, []
    want, _ = ref.greedy(
        prompt,
        final.completion_tokens,
        memory=bank,
        top_k=top_k,
        threshold=threshold,
        layers=set(layers) if layers else None,
        margins=margins,
        shares=shares,
    )
    assert_decidable(margins)
    assert got == want and final.completion_tokens == n
    assert sorted(shares) == applied
    per_layer = {i: float(np.mean(shares[i])) for i in applied}
    for i in applied:
        assert len(shares[i]) == n * engine.num_heads  # every step that made a token, every head
        assert d(BY_LAYER + "_count", layer=str(i)) == 1
        assert d(BY_LAYER + "_sum", layer=str(i)) == pytest.approx(per_layer[i], abs=1e-4)
    for i in set(range(engine.num_layers)) - set(applied):
        assert d(BY_LAYER + "_count", layer=str(i)) == 0
    assert d(SHARE + "_count") == 1
    assert d(SHARE + "_sum") == pytest.approx(np.mean(list(per_layer.values())), abs=1e-4)
    assert 0 < d(SHARE + "_sum") < 1


async def test_attention_mass_of_requests_sharing_a_batch(engine, memory):
    """Two requests with the same memories decode in one group: each one's mean share is its solo
    value (the per-row split of a batched forward gives each request its own row)."""
    mid, _ = memory
    opts = MemoryOptions((mid,), top_k=4)
    reqs = [
        GenerationRequest(engine.tokenizer.encode(p), Sampling(max_tokens=m), opts)
        for p, m in (("Alice met Bob at the station", 10), ("Water boils at", 6))
    ]
    solo = []
    for r in reqs:
        d = Delta(key(SHARE + "_sum"))
        await run(engine, r)
        solo.append(d(SHARE + "_sum"))
    d = Delta(key(SHARE + "_sum"), key(SHARE + "_count"))
    await asyncio.gather(*(run(engine, r) for r in reqs))
    assert d(SHARE + "_count") == 2
    assert d(SHARE + "_sum") == pytest.approx(sum(solo), abs=1e-4)
    assert solo[0] != pytest.approx(solo[1], abs=1e-4)  # two different values: no mix-up hides


async def test_bank_cache_hits_misses_and_bytes(engine, memory):
    mid, _ = memory
    prompt = engine.tokenizer.encode("The capital of France is")
    engine.mlx.call(engine.bank_cache.evict, mid)
    d = Delta(key("extmind_generator_bank_cache_hits_total"), key("extmind_generator_bank_cache_misses_total"))
    req = GenerationRequest(prompt, Sampling(max_tokens=2), MemoryOptions((mid,), top_k=2))
    await run(engine, req)
    assert d("extmind_generator_bank_cache_misses_total") == 1
    assert d("extmind_generator_bank_cache_hits_total") == 0
    await run(engine, req)
    assert d("extmind_generator_bank_cache_misses_total") == 1
    assert d("extmind_generator_bank_cache_hits_total") == 1
    stats = engine.stats()
    assert sample("extmind_generator_bank_cache_bytes") == stats["cached_bytes"] > 0
    assert sample("extmind_generator_bank_cache_banks") == stats["cached_banks"] == 1


async def test_bank_cache_counts_every_request_of_a_shared_lookup(engine, memory):
    """Requests that arrive together share one memory lookup (services/generator/coalesce.py):
    the bank is fetched once (one miss), and every memory of every request is still one lookup
    (the others are hits), as when they arrive one after another (docs/architecture.md,
    "Metrics")."""
    mid, tokens = memory
    hits, misses = key("extmind_generator_bank_cache_hits_total"), key("extmind_generator_bank_cache_misses_total")
    reqs = [
        GenerationRequest(tokens[i * 7 : i * 7 + 6], Sampling(max_tokens=2), MemoryOptions((mid,))) for i in range(4)
    ]
    await run(engine, reqs[0])  # the bank is cached
    d = Delta(hits, misses)
    await asyncio.gather(*(run(engine, r) for r in reqs))
    assert (d(hits[0]), d(misses[0])) == (4, 0)
    engine.mlx.call(engine.bank_cache.evict, mid)
    d = Delta(hits, misses)
    await asyncio.gather(*(run(engine, r) for r in reqs))
    assert (d(hits[0]), d(misses[0])) == (3, 1)


async def test_a_cancelled_request_is_timed_as_cancelled(engine):
    d = Delta(
        key("extmind_generator_request_seconds_count", finish_reason="cancelled"),
        key("extmind_generator_request_seconds_count", finish_reason="length"),
    )
    stream = engine.generate(GenerationRequest(engine.tokenizer.encode("The river"), Sampling(max_tokens=500)))
    await anext(stream)  # the first chunk: the request is running
    await stream.aclose()  # the caller went away
    assert engine.stats()["active"] == 0  # stats runs on the MLX thread after the queued cancel
    assert d("extmind_generator_request_seconds_count", finish_reason="cancelled") == 1
    assert d("extmind_generator_request_seconds_count", finish_reason="length") == 0
    assert sample("extmind_generator_running_requests") == 0


async def test_solo_sequences_are_counted_by_how_they_went_solo(engine, monkeypatch):
    """A lone request starts solo from its prompt; a second one joining sends it back into the
    batch (resumed); alone again after SOLO_AFTER steps it is handed over to solo once more."""
    from services.generator import scheduler as sched

    from .test_solo_decode import joined

    monkeypatch.setattr(sched.Scheduler, "SOLO_AFTER", 2)
    solo = "extmind_generator_solo_sequences_total"
    d = Delta(key(solo, how="from_prompt"), key(solo, how="handed_over"), key(solo, how="resumed"))
    req = GenerationRequest(engine.tokenizer.encode("Alice met Bob at the"), Sampling(max_tokens=16))
    other = GenerationRequest(engine.tokenizer.encode("Water boils at"), Sampling(max_tokens=3))
    a, b = await joined(engine, req, other, monkeypatch)
    assert len(a[0]) == 16 and len(b[0]) == 3
    assert d(solo, how="from_prompt") == 1 and d(solo, how="resumed") == 1 and d(solo, how="handed_over") >= 1
