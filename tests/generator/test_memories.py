"""Memorize + generate with memories, on a real memory service (real Redis, real gRPC), checked
against the independent numpy model."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from extmind import errors
from extmind.channels import sync_channel as grpc_channel
from extmind.procs import free_port
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.memory_builder import _kept_span, plan_windows, read_ahead
from services.generator.request_types import GenerationRequest, MemoryOptions, Sampling

from .helpers import PROMPTS, run
from .memory_helpers import assert_decidable, ref_memory


def test_memorize_stores_raw_keys_without_special_rows(engine, memory, client, ref):
    mid, tokens = memory
    assert tokens[0] == engine.tokenizer.bos_token_id  # the tokenizer adds BOS; its row must go
    mem = client.get_memory(mid, include_tokens=True)
    bank, keep = ref_memory(ref, tokens, engine.special_ids)
    assert list(mem.positions) == keep == list(range(1, len(tokens)))
    assert list(mem.token_ids) == [tokens[p] for p in keep]
    assert mem.model_fingerprint == engine.fingerprint and mem.labels["kind"] == "test"
    keys, values = client.fetch(mid, engine.num_layers)
    for layer, (k, v) in enumerate(bank):
        np.testing.assert_allclose(keys[layer], k, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(values[layer], v, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("top_k,threshold,layers", [(3, None, None), (20, 0.05, None), (5, None, (1,))])
async def test_generation_with_memories_matches_numpy_model(engine, memory, ref, top_k, threshold, layers):
    mid, tokens = memory
    bank, _ = ref_memory(ref, tokens, engine.special_ids)
    prompt = engine.tokenizer.encode("The capital of France is")
    margins = []
    want, want_lp = ref.greedy(
        prompt,
        8,
        memory=bank,
        top_k=top_k,
        threshold=threshold,
        layers=set(layers) if layers else None,
        margins=margins,
    )
    assert_decidable(margins)
    got, got_lp, _, _ = await run(
        engine,
        GenerationRequest(
            prompt,
            Sampling(max_tokens=8),
            MemoryOptions((mid,), top_k=top_k, threshold=threshold, layers=layers or ()),
            return_logprobs=True,
        ),
    )
    _, plain_lp, _, _ = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=8), return_logprobs=True))
    assert got == want
    np.testing.assert_allclose(got_lp, want_lp, atol=1e-3)
    assert not np.allclose(got_lp, plain_lp, atol=1e-3)  # the memories do change the output


async def test_local_and_remote_give_the_same_tokens(engine, memory):
    mid, _ = memory
    prompt = engine.tokenizer.encode("Alice met Bob at")
    for threshold in (None, 0.1):
        out = {}
        for mode in ("local", "remote"):
            out[mode] = await run(
                engine,
                GenerationRequest(
                    prompt,
                    Sampling(max_tokens=10),
                    MemoryOptions((mid,), top_k=4, threshold=threshold, mode=mode),
                    return_logprobs=True,
                ),
            )
        assert out["local"][0] == out["remote"][0]
        np.testing.assert_allclose(out["local"][1], out["remote"][1], atol=1e-4)


async def test_remote_prefill_splits_its_searches_to_fit_the_response_budget(engine, memory, monkeypatch):
    """A prefill's REMOTE answer can exceed the memory service's response budget: the client
    splits the query tokens over several searches (messages of the search stream), and nothing
    else changes."""
    from services.generator import memory_client

    mid, _ = memory
    prompt = engine.tokenizer.encode("Alice met Bob at the station at noon and they talked about music and books")
    req = GenerationRequest(
        prompt, Sampling(max_tokens=6), MemoryOptions((mid,), top_k=5, mode="remote"), return_logprobs=True
    )
    whole = await run(engine, req)
    calls = []
    real = memory_client.search_request

    def counted(*a, **kw):
        calls.append(a[2].shape[1])  # query tokens in this search
        return real(*a, **kw)

    monkeypatch.setattr(memory_client, "SEARCH_ANSWER_BUDGET", 4096 + 3 * 4 * 5 * (12 + 2 * 16 * 4))
    monkeypatch.setattr(memory_client, "search_request", counted)
    split = await run(engine, req)
    assert max(calls) == 3 and len(calls) > engine.num_layers  # the prefill went in pieces of 3 tokens
    assert split[0] == whole[0]
    np.testing.assert_allclose(split[1], whole[1], atol=1e-5)


async def test_eight_concurrent_requests_with_mixed_memories_equal_alone(engine, memory):
    mid, _ = memory
    other = (await engine.memorize(engine.tokenizer.encode("The river flows to the sea, and the sea rises.")))[
        "memory_id"
    ]
    reqs = []
    for i, p in enumerate(PROMPTS):
        mem = [
            None,
            MemoryOptions((mid,), top_k=3),
            MemoryOptions((other,), top_k=2),
            MemoryOptions((mid, other), top_k=5, mode="remote"),
        ][i % 4]
        reqs.append(GenerationRequest(engine.tokenizer.encode(p), Sampling(max_tokens=10), mem))
    alone = [await run(engine, r) for r in reqs]
    together = await asyncio.gather(*(run(engine, r) for r in reqs))
    for a, b in zip(alone, together):
        assert a[0] == b[0]
    assert engine.stats()["active"] == 0


async def test_memory_errors_have_the_right_codes(engine, memory, qwen3_path, memory_address, client):
    mid, _ = memory
    prompt = engine.tokenizer.encode("Hello")
    with pytest.raises(errors.NotFound):
        await run(engine, GenerationRequest(prompt, Sampling(max_tokens=2), MemoryOptions(("no-such-memory",))))
    for mode in ("local", "remote"):  # the same memory twice would count double in LOCAL only
        with pytest.raises(errors.InvalidArgument, match="more than once"):
            await run(engine, GenerationRequest(prompt, Sampling(max_tokens=2), MemoryOptions((mid, mid), mode=mode)))
    qwen = GeneratorEngine(EngineConfig(model=str(qwen3_path), memory_url=memory_address))
    qwen.start()
    try:
        foreign = (await qwen.memorize(qwen.tokenizer.encode("Rome is the capital of Italy.")))["memory_id"]
        assert qwen.fingerprint != engine.fingerprint
        with pytest.raises(errors.FailedPrecondition, match="another model"):
            await run(engine, GenerationRequest(prompt, Sampling(max_tokens=2), MemoryOptions((foreign,))))
    finally:
        qwen.stop()
    # a memory whose token ids this model's tokenizer never made (another client wrote it with
    # our fingerprint): its citations cannot be decoded, a clear FAILED_PRECONDITION, not INTERNAL
    from extmind.v1 import memory_pb2_grpc
    from tests.memory import helpers as mh

    assert engine.vocab_size < 1000  # the helper's token ids start at 1000
    K = np.zeros((engine.num_layers, engine.num_kv_heads, 4, engine.head_dim), np.float32)
    with grpc_channel(memory_address) as ch:
        mh.build(memory_pb2_grpc.MemoryServiceStub(ch), "foreign-ids", K, K, mh.FLOAT32, fingerprint=engine.fingerprint)
    with pytest.raises(errors.FailedPrecondition, match="outside this model's vocabulary"):
        await run(
            engine,
            GenerationRequest(prompt, Sampling(max_tokens=2), MemoryOptions(("foreign-ids",), return_citations=True)),
        )
    # keys and values no model produces (finite, 3e38): REMOTE's queries overflow at the next layer,
    # a FAILED_PRECONDITION naming the memory, not the memory service's INVALID_ARGUMENT about
    # queries the caller never sent
    huge = np.full((engine.num_layers, engine.num_kv_heads, 4, engine.head_dim), 3e38, np.float32)
    with grpc_channel(memory_address) as ch:
        mh.build(
            memory_pb2_grpc.MemoryServiceStub(ch), "huge-rows", huge, huge, mh.FLOAT32, fingerprint=engine.fingerprint
        )
    with pytest.raises(errors.FailedPrecondition, match=r"not finite.*huge-rows"):
        await run(
            engine, GenerationRequest(prompt, Sampling(max_tokens=2), MemoryOptions(("huge-rows",), mode="remote"))
        )
    # a deleted and re-created memory is never served from the stale cache
    tokens_a = engine.tokenizer.encode("Paris is the capital of France.")
    tokens_b = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog.")
    await engine.memorize(tokens_a, memory_id="recreated")
    r = GenerationRequest(prompt, Sampling(max_tokens=6), MemoryOptions(("recreated",), top_k=2), return_logprobs=True)
    first = await run(engine, r)
    client.delete_memory("recreated")
    with pytest.raises(errors.NotFound):
        await run(engine, r)
    await engine.memorize(tokens_b, memory_id="recreated")
    second = await run(engine, r)
    await engine.memorize(tokens_b, memory_id="fresh")
    fresh = await run(
        engine,
        GenerationRequest(prompt, Sampling(max_tokens=6), MemoryOptions(("fresh",), top_k=2), return_logprobs=True),
    )
    assert second[1] == fresh[1] and second[1] != first[1]
    # still serving
    assert len((await run(engine, GenerationRequest(prompt, Sampling(max_tokens=2))))[0]) == 2


async def test_memory_service_down_is_unavailable(llama_path):
    dead = GeneratorEngine(
        EngineConfig(model=str(llama_path), memory_url=f"127.0.0.1:{free_port()}", memory_timeout=2.0)
    )
    dead.start()
    try:
        prompt = dead.tokenizer.encode("Hello")
        with pytest.raises(errors.Unavailable, match="memory service"):
            await run(dead, GenerationRequest(prompt, Sampling(max_tokens=2), MemoryOptions(("m",))))
        with pytest.raises(errors.Unavailable):
            await dead.memorize(prompt)
        assert len((await run(dead, GenerationRequest(prompt, Sampling(max_tokens=2))))[0]) == 2
    finally:
        dead.stop()


def test_window_plan_covers_every_token_once():
    for n, window, stride in [(7000, 3072, 512), (3072, 3072, 512), (3073, 3072, 512), (10, 4, 3), (1, 3072, 512)]:
        plan = plan_windows(n, window, stride)
        covered = []
        for i, w in enumerate(plan):
            assert w.start == i * stride and w.end == min(i * stride + window, n)
            assert w.first_new == (0 if i == 0 else plan[i - 1].end)
            assert i == 0 or w.first_new - w.start >= window - stride  # left context of new rows
            covered += range(w.first_new, w.end)
        assert covered == list(range(n)) and plan[-1].end == n
    with pytest.raises(errors.InvalidArgument):
        plan_windows(10, 4, 5)


def test_kept_rows_of_one_run_are_a_slice():
    assert _kept_span([0, 1, 2]) == slice(0, 3) and _kept_span([5]) == slice(5, 6)
    assert _kept_span([0, 2, 3]) is None and _kept_span([]) is None


def test_read_ahead_computes_the_next_item_while_the_caller_holds_one():
    import threading

    second_started = threading.Event()
    closed = threading.Event()

    def items():
        try:
            yield 1
            second_started.set()
            yield 2
            yield 3
        finally:
            closed.set()

    it = read_ahead(items())
    assert next(it) == 1
    assert second_started.wait(5)  # computed while the caller still holds item 1
    assert list(it) == [2, 3] and closed.is_set()

    def failing():
        yield 1
        raise errors.Internal("the device fell over")

    it = read_ahead(failing())
    assert next(it) == 1
    with pytest.raises(errors.Internal, match="fell over"):
        next(it)

    closed.clear()
    it = read_ahead(items())
    assert next(it) == 1
    it.close()  # a caller that stops early: the item in progress ends, the source is closed
    assert closed.is_set()


def test_memory_building_on_7000_tokens(engine, client, ref):
    rng = np.random.default_rng(11)
    specials = sorted(engine.special_ids)
    tokens = [int(t) for t in rng.integers(0, engine.vocab_size, 7200) if int(t) not in engine.special_ids][:6990]
    for pos in (0, 100, 3071, 3072, 3583, 5000, 6500):  # specials at window edges too
        tokens.insert(pos, specials[pos % len(specials)])
    assert len(tokens) == 6997
    out = engine.memorize_blocking(tokens, memory_id="long", window=3072, stride=512)
    keep = [p for p, t in enumerate(tokens) if t not in engine.special_ids]
    assert out["num_rows"] == len(keep) == 6990 and out["num_tokens"] == 6997
    mem = client.get_memory("long", include_tokens=True)
    assert list(mem.positions) == keep and list(mem.token_ids) == [tokens[p] for p in keep]
    keys, values = client.fetch("long", engine.num_layers)
    assert keys[0].shape[1] == 6990
    plan = plan_windows(len(tokens), 3072, 512)
    assert len(plan) == 9
    row_of = {p: r for r, p in enumerate(keep)}
    # rows of the first window, of a middle window and of the last: the numpy model run on exactly
    # that window (positions from 0) gives the same raw keys and values
    for w, positions in ((plan[0], [1, 2000, 3070]), (plan[4], [5000 - 1, 5100]), (plan[-1], [6700, 6996])):
        cap = []
        ref.forward(tokens[w.start : w.end], capture=cap)
        for p in positions:
            assert w.first_new <= p < w.end and p in row_of
            for layer, (k, v) in enumerate(cap):
                np.testing.assert_allclose(keys[layer][:, row_of[p]], k[:, p - w.start], rtol=1e-4, atol=1e-4)
                np.testing.assert_allclose(values[layer][:, row_of[p]], v[:, p - w.start], rtol=1e-4, atol=1e-4)
