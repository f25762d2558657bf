"""Memorize + generate with memories, on a real memory service (real Redis, real gRPC), checked
against the independent numpy model."""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import replace

import numpy as np
import pytest

from extmind import errors
from extmind.channels import sync_channel as grpc_channel
from extmind.procs import free_port
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.memory_builder import plan_windows
from services.generator.memory_client import MemoryClient
from services.generator.request_types import Chunk, GenerationRequest, MemoryOptions, Sampling

from .helpers import PROMPTS, run
from .np_reference import Model, Retrievals

TEXT = (
    "Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy. "
    "Alice met Bob at the station at noon. They talked about music, books, weather and trains. "
    "Water boils at one hundred degrees Celsius at sea level."
)


@pytest.fixture(scope="module")
def memory_address(module_memory_service):
    return module_memory_service.address


@pytest.fixture(scope="module")
def engine(llama_path, memory_address):
    e = GeneratorEngine(EngineConfig(model=str(llama_path), memory_url=memory_address, window=3072, stride=512))
    e.start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def memory(engine):
    tokens = engine.tokenizer.encode(TEXT)
    out = engine.memorize_blocking(tokens, labels={"kind": "test"})
    return out["memory_id"], tokens


@pytest.fixture(scope="module")
def client(memory_address):
    c = MemoryClient(memory_address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def ref(llama_path):
    return Model(llama_path)


def _ref_memory(ref, tokens, special):
    cap = []
    ref.forward(tokens, capture=cap)
    keep = [p for p, t in enumerate(tokens) if t not in special]
    return [(k[:, keep], v[:, keep]) for k, v in cap], keep


def test_memorize_stores_raw_keys_without_special_rows(engine, memory, client, ref):
    mid, tokens = memory
    assert tokens[0] == engine.tokenizer.bos_token_id  # the tokenizer adds BOS; its row must go
    mem = client.get_memory(mid, include_tokens=True)
    bank, keep = _ref_memory(ref, tokens, engine.special_ids)
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
    bank, _ = _ref_memory(ref, tokens, engine.special_ids)
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
    splits the query tokens over several SearchMemory calls, and nothing else changes."""
    from services.generator import memory_client

    mid, _ = memory
    prompt = engine.tokenizer.encode("Alice met Bob at the station at noon and they talked about music and books")
    req = GenerationRequest(
        prompt, Sampling(max_tokens=6), MemoryOptions((mid,), top_k=5, mode="remote"), return_logprobs=True
    )
    whole = await run(engine, req)
    calls = []
    real = memory_client.MemoryClient._search_once

    def counted(self, *a, **kw):
        calls.append(a[2].shape[1])  # query tokens in this call
        return real(self, *a, **kw)

    monkeypatch.setattr(memory_client, "SEARCH_ANSWER_BUDGET", 4096 + 3 * 4 * 5 * (12 + 2 * 16 * 4))
    monkeypatch.setattr(memory_client.MemoryClient, "_search_once", counted)
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


# float32 vs float64 logits differ by ~1e-5 here; a greedy token is compared only where the
# reference's best logit beats the second by far more than that.
LOGIT_MARGIN = 1e-3


def assert_decidable(margins):
    worst = min(margins)
    assert worst > LOGIT_MARGIN, (
        f"the reference's two best logits are {worst:.2e} apart at step "
        f"{margins.index(worst)}: too close to compare greedy tokens; pick another prompt"
    )


def assert_counts_match(got: dict, want: Retrievals):
    """Per-row counts equal the reference's, except rows inside the tie slack (see Retrievals)."""
    bad = want.mismatches(got)
    assert not bad, "retrieval counts differ from the numpy model:\n" + "\n".join(bad)
    assert want.ambiguous <= want.events // 4, f"{want.ambiguous} of {want.events} retrievals were ties"


def _row_hits(final, tokens, tokenizer) -> dict[int, int]:
    """The request's per-row retrieval counts (rows are the non-BOS tokens: row = position - 1),
    after checking that its citation spans are made of them: each span's hits are the sum of its
    rows' counts, its text decodes its tokens, spans do not overlap, every hot row (>= 2x the mean
    count) and the most retrieved row are cited, and spans come most retrieved first."""
    counts = final.row_counts
    assert counts is not None and len(counts) == len(tokens) - 1
    covered = set()
    for c in final.citations:
        assert 1 <= c.token_start < c.token_end <= len(tokens)
        rows = range(c.token_start - 1, c.token_end - 1)
        assert c.row_hits == [int(counts[r]) for r in rows] and c.hits == sum(c.row_hits)
        assert c.text == tokenizer.decode(tokens[c.token_start : c.token_end])
        assert covered.isdisjoint(rows)
        covered.update(rows)
    hot = {int(r) for r in np.flatnonzero(counts >= max(2 * counts.mean(), 1))} or {int(np.argmax(counts))}
    assert hot <= covered and int(np.argmax(counts)) in covered
    hits = [c.hits for c in final.citations]
    assert hits == sorted(hits, reverse=True)
    return {int(r): int(n) for r, n in enumerate(counts) if n}


async def _timed(engine, req):
    """run() plus the times of the first chunk and of the end (to prove two requests overlapped)."""
    chunks, final, first = [], None, None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            first = first or time.monotonic()
            chunks.append(ev)
        else:
            final = ev
    return [t for c in chunks for t in c.token_ids], final, first, time.monotonic()


@pytest.mark.parametrize(
    "mode,top_k,threshold,layers",
    [("local", 3, None, None), ("local", 20, 0.05, None), ("local", 5, None, (1,)), ("remote", 8, 0.3, None)],
)
async def test_citations_count_the_live_retrievals(engine, memory, ref, mode, top_k, threshold, layers):
    """The counts are those of the request's own steps: equal, row by row, to the numpy model's
    retrievals at every step that made a token (all layers and heads)."""
    mid, tokens = memory
    bank, _ = _ref_memory(ref, tokens, engine.special_ids)
    prompt = engine.tokenizer.encode("Alice met Bob at")
    n = 6
    opts = MemoryOptions(
        (mid,),
        top_k=top_k,
        threshold=threshold,
        mode=mode,
        layers=layers or (),
        return_citations=True,
        max_citations=1000,
    )
    got, _, _, final = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=n), opts))
    want_hits, margins = Retrievals(), []
    want, _ = ref.greedy(
        prompt,
        final.completion_tokens,
        memory=bank,
        top_k=top_k,
        threshold=threshold,
        layers=set(layers) if layers else None,
        hits=want_hits,
        margins=margins,
    )
    assert_decidable(margins)
    assert got == want[: len(got)] and final.completion_tokens == n
    cites = final.citations
    assert cites and all(c.memory_id == mid for c in cites)
    got_hits = _row_hits(final, tokens, engine.tokenizer)
    # Exact ties (a repeated token's layer-0 keys are identical) and rounding may swap rows at the
    # top-k boundary, LOCAL (MLX argpartition) and REMOTE (FAISS) alike; nothing else may differ.
    assert_counts_match(got_hits, want_hits)
    total = sum(got_hits.values())
    per_step = (len(layers) if layers else engine.num_layers) * engine.num_heads
    if threshold is None:  # every applied layer, head and generated step retrieved k rows
        assert total == per_step * final.completion_tokens * top_k
    else:
        assert 0 < total < per_step * final.completion_tokens * min(top_k, len(bank[0][0][0]))
    _, _, _, top = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=n), replace(opts, max_citations=2)))
    assert top.citations == cites[:2]
    # a request without citations returns none (and is not counted)
    _, _, _, plain = await run(
        engine, GenerationRequest(prompt, Sampling(max_tokens=n), replace(opts, return_citations=False))
    )
    assert plain.citations == []


async def test_concurrent_requests_with_citations_each_count_their_own(engine, memory, ref):
    """Two citing requests in one batch (different prompt lengths, one stopped by a stop string,
    one by length), next to a non-citing request with the same memory and a plain one: each
    request's citations equal its solo run and the numpy model's retrievals."""
    mid, tokens = memory
    bank, _ = _ref_memory(ref, tokens, engine.special_ids)
    opts = MemoryOptions((mid,), top_k=3, return_citations=True, max_citations=1000)
    a_prompt = engine.tokenizer.encode("Alice met Bob at the station and they talked about")
    b_prompt = engine.tokenizer.encode("Water boils at")
    # B stops on a stop string taken from its own greedy text (exercises the early removal path)
    _, _, b_text, _ = await run(engine, GenerationRequest(b_prompt, Sampling(max_tokens=14), opts))
    stop = re.search(r"[A-Za-z]{2,}", b_text[len(b_text) // 3 :]).group()
    reqs = [
        GenerationRequest(a_prompt, Sampling(max_tokens=12), opts),
        GenerationRequest(b_prompt, Sampling(max_tokens=14, stop=(stop,)), opts),
        GenerationRequest(a_prompt, Sampling(max_tokens=12), replace(opts, return_citations=False)),
        GenerationRequest(b_prompt, Sampling(max_tokens=12)),
    ]
    solo = [await _timed(engine, r) for r in reqs]
    together = await asyncio.gather(*(_timed(engine, r) for r in reqs))
    (a_tok, a_fin, a_first, a_end), (b_tok, b_fin, b_first, b_end) = together[:2]
    assert a_first < b_end and b_first < a_end, "the two citing requests did not share the batch"
    assert b_fin.finish_reason == "stop_sequence" and b_fin.completion_tokens < 14
    for s, t in zip(solo, together):
        assert s[0] == t[0] and s[1].citations == t[1].citations and s[1].finish_reason == t[1].finish_reason
    assert together[2][1].citations == [] and together[3][1].citations == []
    for prompt, fin in ((a_prompt, a_fin), (b_prompt, b_fin)):
        want_hits = Retrievals()
        ref.greedy(prompt, fin.completion_tokens, memory=bank, top_k=3, hits=want_hits)
        got = _row_hits(fin, tokens, engine.tokenizer)
        assert_counts_match(got, want_hits)
        assert sum(got.values()) == engine.num_layers * engine.num_heads * fin.completion_tokens * 3
    assert engine.stats()["active"] == 0


async def test_count_comparison_catches_a_wrong_row(engine, memory, ref):
    """The tie-aware comparison is not a loose one: a top-k with an off-by-one bug, or one hit
    moved to a row that was never retrieved, is rejected."""
    mid, tokens = memory
    bank, _ = _ref_memory(ref, tokens, engine.special_ids)
    prompt = engine.tokenizer.encode("Alice met Bob at")
    want = Retrievals()
    ref.greedy(prompt, 4, memory=bank, top_k=3, hits=want)
    assert not want.mismatches(want.exact)  # the reference's own choice passes
    assert want.mismatches(want.off_by_one)
    planted = dict(want.exact)
    top = max(planted, key=planted.get)
    never = next(r for r in range(len(tokens) - 1) if want.upper.get(r, 0) == 0)
    planted[top] -= 1
    planted[never] = 1
    assert want.mismatches(planted) == [f"row {never}: 1 retrievals, the reference allows 0..0"]


async def test_memory_errors_have_the_right_codes(engine, memory, qwen3_path, memory_address, client):
    mid, _ = memory
    prompt = engine.tokenizer.encode("Hello")
    with pytest.raises(errors.NotFound):
        await run(engine, GenerationRequest(prompt, Sampling(max_tokens=2), MemoryOptions(("no-such-memory",))))
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
