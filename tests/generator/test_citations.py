"""Live citations: each request's per-row retrieval counts equal the numpy model's retrievals,
up to ties at the top-k boundary (and not one row more), alone and in a shared batch."""

from __future__ import annotations

import asyncio
import re
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from services.generator.citations import Picks, memory_weights, picked_rows
from services.generator.request_types import (
    DEFAULT_CITATION_MIN_WEIGHT,
    Chunk,
    GenerationRequest,
    MemoryOptions,
    Sampling,
)

from .helpers import MlxHold, queued, run
from .memory_helpers import LOGIT_MARGIN, assert_counts_match, assert_decidable, ref_memory, row_hits, timed
from .np_reference import Retrievals


@pytest.mark.parametrize(
    "mode,top_k,threshold,layers",
    [("local", 3, None, None), ("local", 20, 0.05, None), ("local", 5, None, (1,)), ("remote", 8, 0.3, None)],
)
async def test_citations_count_the_live_retrievals(engine, memory, ref, mode, top_k, threshold, layers):
    """The counts are those of the request's own steps: equal, row by row, to the numpy model's
    retrievals at every step that made a token (all layers and heads)."""
    mid, tokens = memory
    bank, _ = ref_memory(ref, tokens, engine.special_ids)
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
        citation_min_weight=0.0,  # every top-k pick counts: compared with the reference's retrievals
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
    got_hits = row_hits(final, tokens, engine.tokenizer)
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
    bank, _ = ref_memory(ref, tokens, engine.special_ids)
    opts = MemoryOptions((mid,), top_k=3, return_citations=True, max_citations=1000, citation_min_weight=0.0)
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
    solo = [await timed(engine, r) for r in reqs]
    together = await asyncio.gather(*(timed(engine, r) for r in reqs))
    (a_tok, a_fin, a_first, a_end), (b_tok, b_fin, b_first, b_end) = together[:2]
    assert a_first < b_end and b_first < a_end, "the two citing requests did not share the batch"
    assert b_fin.finish_reason == "stop_sequence" and b_fin.completion_tokens < 14
    for s, t in zip(solo, together):
        assert s[0] == t[0] and s[1].citations == t[1].citations and s[1].finish_reason == t[1].finish_reason
    assert together[2][1].citations == [] and together[3][1].citations == []
    for prompt, fin in ((a_prompt, a_fin), (b_prompt, b_fin)):
        want_hits = Retrievals()
        ref.greedy(prompt, fin.completion_tokens, memory=bank, top_k=3, hits=want_hits)
        got = row_hits(fin, tokens, engine.tokenizer)
        assert_counts_match(got, want_hits)
        assert sum(got.values()) == engine.num_layers * engine.num_heads * fin.completion_tokens * 3
    assert engine.stats()["active"] == 0


async def test_count_comparison_catches_a_wrong_row(engine, memory, ref):
    """The tie-aware comparison is not a loose one: a top-k with an off-by-one bug, or one hit
    moved to a row that was never retrieved, is rejected."""
    mid, tokens = memory
    bank, _ = ref_memory(ref, tokens, engine.special_ids)
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


@pytest.mark.parametrize("mode,threshold", [("local", None), ("remote", None), ("local", 0.5), ("remote", 0.5)])
async def test_citations_count_only_the_memories_attention_used(engine, memory, ref, mode, threshold):
    """With ``citation_min_weight`` a retrieval counts only when the memory got at least that share
    of its head's attention: the counts equal the numpy model's retrievals whose softmax weight
    reaches it. The floor is put in the widest gap between the reference's middle weights (checked to be
    far wider than float32 rounding), and every top-k set is decidable, so the counts are exact
    (layer 1 retrieves: layer 0's keys of a repeated token are identical, a tie)."""
    mid, tokens = memory
    bank, _ = ref_memory(ref, tokens, engine.special_ids)
    prompt = engine.tokenizer.encode("Alice met Bob at")
    n, top_k = 6, 4
    picks, margins, hits = [], [], Retrievals()
    want_tokens, _ = ref.greedy(
        prompt, n, memory=bank, top_k=top_k, threshold=threshold, layers={1}, hits=hits, margins=margins, picks=picks
    )
    assert_decidable(margins)
    assert hits.ambiguous == 0, f"{hits.ambiguous} retrievals had a tie at the top-k boundary; pick another prompt"
    weights = np.sort(np.concatenate([w for _, w in picks]))
    if threshold is not None:  # the threshold masks many picks (here 71 of 96): those must never count
        assert 0 < len(weights) < len(picks) * top_k // 2
    inside = weights[len(weights) // 5 : len(weights) * 4 // 5]  # a floor that drops some and keeps many
    gaps = np.diff(inside)
    i = int(np.argmax(gaps))
    floor = float(inside[i] + inside[i + 1]) / 2
    assert gaps[i] > 1e-4, f"the reference's memory weights leave no clear gap ({gaps[i]:.1e})"
    counted = sum(int((w >= floor).sum()) for _, w in picks)
    assert len(weights) // 5 <= counted <= len(weights) * 4 // 5
    want: dict[int, int] = {}
    for rows, w in picks:
        for r in rows[w >= floor]:
            want[int(r)] = want.get(int(r), 0) + 1
    opts = MemoryOptions(
        (mid,),
        top_k=top_k,
        threshold=threshold,  # picks it masks weigh nothing: never counted, whatever the floor
        mode=mode,
        layers=(1,),
        return_citations=True,
        max_citations=1000,
        citation_min_weight=floor,
    )
    got_tokens, _, _, final = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=n), opts))
    assert got_tokens == want_tokens
    got = row_hits(final, tokens, engine.tokenizer)
    assert {r: c for r, c in got.items() if c} == want
    # the default floor applies when the request sets none
    assert MemoryOptions((mid,)).citation_min_weight == DEFAULT_CITATION_MIN_WEIGHT > 0


def test_memory_weights_from_the_fused_outputs_are_the_softmax_weights():
    """``memory_weights`` rebuilds each retrieved memory's softmax weight from what the fused
    kernels return (rows, raw dots, the head's memory mass); checked against one softmax over
    [memories | local] computed directly, with masked picks (-1) weighing nothing."""
    rng = np.random.default_rng(0)
    B, H, L, k, S, scale = 2, 3, 4, 5, 7, 0.25
    dots = rng.normal(size=(B, H, L, k)).astype(np.float32) * 4
    local = rng.normal(size=(B, H, L, S)).astype(np.float32) * 4
    rows = rng.integers(0, 50, size=(B, H, L, k)).astype(np.int32)
    rows[0, 1, 2, 3:] = -1  # masked by the threshold
    rows[1, 0, 0, :] = -1  # nothing kept
    logits = np.concatenate([np.where(rows >= 0, dots * scale, -np.inf), local * scale], -1).astype(np.float64)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    mass = w[..., :k].sum(-1)
    got = memory_weights(mx.array(rows), mx.array(dots), mx.array(mass.astype(np.float32)), scale)
    np.testing.assert_allclose(np.array(got), w[..., :k], rtol=1e-5, atol=1e-7)


async def test_requests_whose_floors_cannot_differ_share_one_batch_group(engine, memory):
    """The floor is part of the batch group key, as the group records with one floor. A gRPC
    float 0.02 (float32) and the default 0.02 are one floor (the attention compares in float32),
    and a request that returns no citations batches whatever floor it names: three such requests
    queued together run in one group, and the citing one counts as it does alone."""

    mid, _ = memory
    prompt = engine.tokenizer.encode("Alice met Bob at")
    base = MemoryOptions((mid,), top_k=4, mode="remote", max_citations=1000)
    grpc_floor = float(np.float32(DEFAULT_CITATION_MIN_WEIGHT))  # what the servicer reads from the proto
    assert grpc_floor != DEFAULT_CITATION_MIN_WEIGHT
    citing = replace(base, return_citations=True, citation_min_weight=grpc_floor)
    others = [replace(base, citation_min_weight=0.0), replace(base, citation_min_weight=0.5), base]
    reqs = [GenerationRequest(prompt, Sampling(max_tokens=8), o) for o in (citing, *others)]
    solo = replace(citing, citation_min_weight=DEFAULT_CITATION_MIN_WEIGHT)
    alone = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=8), solo))
    assert any(c.hits for c in alone[3].citations), "the solo run cites nothing: the comparison below would be empty"

    # Hold the MLX thread until all four admits wait behind it; a probe queued after them reads
    # the groups before any decode step (one worker thread: first in, first run).
    for _ in range(500):  # the solo run's group is gone and no step of it is queued any more
        if engine.stats()["groups"] == 0 and not engine.mlx.has_waiting():
            break
        await asyncio.sleep(0.02)
    hold = MlxHold(engine, seconds=60)
    await hold.started()
    try:
        tasks = [asyncio.create_task(run(engine, r)) for r in reqs]
        # REMOTE: after resolving, each request's next MLX call is its admit
        await queued(engine, len(reqs), seconds=30)
        assert engine.mlx._waiting == len(reqs)
        probe = engine.mlx.submit(engine._scheduler.stats)
    finally:
        hold.release()
    stats = await asyncio.wrap_future(probe)
    results = await asyncio.gather(*tasks)
    assert stats == dict(stats, active=len(reqs), groups=1)
    assert results[0][0] == alone[0]
    assert results[0][3].citations == alone[3].citations  # row_hits too


@pytest.mark.parametrize("mode", ["local", "remote"])
async def test_floored_citations_of_requests_that_join_and_leave_a_batch_across_flushes(
    engine, memory, ref, monkeypatch, mode
):
    """Two citing requests with one floor share a batch (different prompt lengths and token
    counts, so one joins after the other started and leaves first) while their counts flush every
    3 steps: each request's counts equal the numpy model's retrievals whose softmax weight reaches
    the floor. A flush mid-batch must take each request's own batch row, whatever the batch's size
    at the step the picks were recorded."""
    from services.generator.batch_tally import BatchTally

    monkeypatch.setattr(BatchTally, "FLUSH_STEPS", 3)
    mid, tokens = memory
    bank, _ = ref_memory(ref, tokens, engine.special_ids)
    top_k = 4
    lengths = [11, 7]
    # The first two prompts whose reference runs are decidable (greedy margins, no top-k ties).
    prompts, picks_of, want_tokens = [], [], []
    for text in ("Alice met Bob at", "Water boils at", "The station", "Bob said", "Alice and Bob talked about"):
        prompt, n = engine.tokenizer.encode(text), lengths[len(prompts)]
        picks, hits, margins = [], Retrievals(), []
        toks, _ = ref.greedy(prompt, n, memory=bank, top_k=top_k, layers={1}, hits=hits, margins=margins, picks=picks)
        if hits.ambiguous == 0 and min(margins) > LOGIT_MARGIN:
            prompts.append(prompt)
            want_tokens.append(toks)
            picks_of.append(picks)
            if len(prompts) == 2:
                break
    assert len(prompts) == 2, "too few decidable prompts"
    assert len(prompts[0]) != len(prompts[1])
    weights = np.sort(np.concatenate([w for picks in picks_of for _, w in picks]))
    inside = weights[len(weights) // 5 : len(weights) * 4 // 5]
    gaps = np.diff(inside)
    i = int(np.argmax(gaps))
    floor = float(np.float32((inside[i] + inside[i + 1]) / 2))
    assert gaps[i] > 1e-4, f"the reference's memory weights leave no clear gap ({gaps[i]:.1e})"
    opts = MemoryOptions(
        (mid,),
        top_k=top_k,
        mode=mode,
        layers=(1,),
        return_citations=True,
        max_citations=1000,
        citation_min_weight=floor,
    )
    reqs = [GenerationRequest(p, Sampling(max_tokens=n), opts) for p, n in zip(prompts, lengths)]
    together = await asyncio.gather(*(timed(engine, r) for r in reqs))
    (_, a_fin, a_first, a_end), (_, b_fin, b_first, b_end) = together
    assert a_first < b_end and b_first < a_end, "the two citing requests did not share the batch"
    for (got_tokens, fin, _, _), picks, toks in zip(together, picks_of, want_tokens):
        assert got_tokens == toks
        want: dict[int, int] = {}
        for rows, w in picks:
            for r in rows[w >= floor]:
                want[int(r)] = want.get(int(r), 0) + 1
        got = row_hits(fin, tokens, engine.tokenizer)
        assert {r: c for r, c in got.items() if c} == want


async def test_a_citing_request_cancelled_mid_batch_leaves_the_others_counts_exact(engine, memory, ref, monkeypatch):
    """Two citing requests with a floor share a batch; one is cancelled (its stream closed) after
    a few tokens, between flushes (every 3 steps). The other's counts still equal the numpy
    model's picks whose weight reaches the floor, and the cancelled one leaves no request behind."""
    from services.generator.batch_tally import BatchTally

    monkeypatch.setattr(BatchTally, "FLUSH_STEPS", 3)
    mid, tokens = memory
    bank, _ = ref_memory(ref, tokens, engine.special_ids)
    top_k, n, floor = 4, 10, 0.05
    prompt = engine.tokenizer.encode("Alice met Bob at")
    picks, hits, margins = [], Retrievals(), []
    want_tokens, _ = ref.greedy(
        prompt, n, memory=bank, top_k=top_k, layers={1}, hits=hits, margins=margins, picks=picks
    )
    assert_decidable(margins)
    assert hits.ambiguous == 0
    weights = np.concatenate([w for _, w in picks])
    assert np.abs(weights - floor).min() > 1e-4, "a weight within rounding of the floor; pick another"
    want: dict[int, int] = {}
    for rows, w in picks:
        for r in rows[w >= floor]:
            want[int(r)] = want.get(int(r), 0) + 1
    assert want, "nothing reaches the floor: the comparison would be empty"
    opts = MemoryOptions(
        (mid,), top_k=top_k, layers=(1,), return_citations=True, max_citations=1000, citation_min_weight=floor
    )
    victim = engine.generate(
        # as long as the context allows: still running when closed, however many tokens one Chunk joins
        GenerationRequest(engine.tokenizer.encode("Water boils at"), Sampling(max_tokens=100_000), opts)
    )
    assert isinstance(await victim.__anext__(), Chunk)  # admitted and generating
    kept = engine.generate(GenerationRequest(prompt, Sampling(max_tokens=n), opts))
    events = [await kept.__anext__()]  # the kept request generates while the victim still runs
    assert isinstance(events[0], Chunk)
    assert isinstance(await victim.__anext__(), Chunk)  # not ended by itself
    await victim.aclose()
    events += [ev async for ev in kept]
    got_tokens = [t for ev in events[:-1] for t in ev.token_ids]
    fin = events[-1]
    assert got_tokens == want_tokens
    got = row_hits(fin, tokens, engine.tokenizer)
    assert {r: c for r, c in got.items() if c} == want
    for _ in range(200):
        if engine.stats()["active"] == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.stats()["active"] == 0


@pytest.mark.parametrize("how", ["cancelled", "length"])
async def test_a_group_drops_its_pending_picks_once_no_request_cites(engine, memory, monkeypatch, how):
    """The group's counts tally keeps the forwards recorded since its last flush, each holding its
    whole-batch picks (with a large top-k, tens of MiB). When the last citing request leaves
    (cancelled mid-window, or ended by length) while a non-citing request goes on in the same
    group, nothing is recorded any more and no flush would come: what is pending is dropped at the
    next step, not held for as long as the group lives."""

    from services.generator.batch_tally import BatchTally
    from services.generator.in_flight import InFlight

    monkeypatch.setattr(BatchTally, "FLUSH_STEPS", 10_000)  # no flush by steps: only leaving can clear
    seen = {}
    finish = InFlight._finish

    def spy(self, r, reason):  # what the group's tally holds when each request ends
        seen[r.counts is not None] = (len(r.group.requests), len(r.group.counts._pending))
        finish(self, r, reason)

    monkeypatch.setattr(InFlight, "_finish", spy)
    mid, _ = memory
    opts = MemoryOptions((mid,), top_k=4, return_citations=True, max_citations=1000)  # the default floor
    plain = replace(opts, return_citations=False)  # the same group (its floor is the default)
    # Both admitted before either steps (the MLX thread held meanwhile); the non-citing request
    # runs 69 tokens (greedy, ends by EOS), the citing one leaves after 2 (cancelled) or 6 (length).
    hold = MlxHold(engine, seconds=60)
    await hold.started()
    try:
        other = engine.generate(
            GenerationRequest(engine.tokenizer.encode("Alice met Bob at"), Sampling(max_tokens=200), plain)
        )
        citing = engine.generate(
            GenerationRequest(
                engine.tokenizer.encode("Water boils at"), Sampling(max_tokens=200 if how == "cancelled" else 6), opts
            )
        )
        first = [asyncio.create_task(anext(s)) for s in (other, citing)]
        await queued(engine, 2, seconds=30)  # each request's next MLX call, after resolving, is its admit
        assert engine.mlx._waiting == 2
    finally:
        hold.release()
    events = [await first[0]]
    assert isinstance(await first[1], Chunk)  # admitted and generating
    if how == "cancelled":
        assert isinstance(await citing.__anext__(), Chunk)
        await citing.aclose()
    else:
        rest = [ev async for ev in citing]
        assert rest[-1].finish_reason == "length" and rest[-1].citations
    events += [ev async for ev in other]
    assert events[-1].completion_tokens > 20  # it went on well past the citing request
    assert seen[True][0] == 2 if how == "length" else True not in seen
    assert seen[False] == (1, 0), "the group still held the forwards of a citing request that left"


def test_a_flush_counts_floored_rows_as_recorded_and_weighs_the_others():
    """One flush may join forwards whose picks the fused decode kernel floored itself (rows only)
    with picks recorded with their dots and mass (the portable path: a context past the kernel's
    shared memory, say): the first count as recorded, the second by their softmax weights."""
    rng = np.random.default_rng(4)
    B, H, k, scale, floor = 2, 3, 4, 0.25, 0.05
    floored = rng.integers(-1, 40, size=(B, H, 1, k)).astype(np.int32)
    rows = rng.integers(0, 40, size=(B, H, 1, k)).astype(np.int32)
    dots = (rng.normal(size=(B, H, 1, k)) * 4).astype(np.float32)
    mass = rng.uniform(0.2, 0.9, size=(B, H, 1)).astype(np.float32)
    w = np.array(memory_weights(mx.array(rows), mx.array(dots), mx.array(mass), scale))
    assert 0 < (w >= floor).sum() < w.size and np.abs(w - floor).min() > 1e-4
    weighed = Picks(mx.array(rows), mx.array(dots), mx.array(mass), scale)
    got = np.array(picked_rows([[Picks(mx.array(floored))], [weighed]], min_weight=floor))
    want = np.concatenate([floored.reshape(B, -1), np.where(w >= floor, rows, -1).reshape(B, -1)], axis=1)
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(want, axis=1))
    # without a floor every pick counts as recorded
    got = np.array(picked_rows([[Picks(mx.array(floored))], [Picks(mx.array(rows))]]))
    want = np.concatenate([floored.reshape(B, -1), rows.reshape(B, -1)], axis=1)
    np.testing.assert_array_equal(np.sort(got, axis=1), np.sort(want, axis=1))


def test_a_flush_mixing_floored_stacked_and_weighed_picks_of_two_scales_and_dtypes():
    """A flush's forwards as a group may record them: picks the fused decode kernel floored
    (rows only, layer by layer), picks of the portable path compacted by ``stack_picks`` (one
    record of every layer), weighed picks of two scales, float16 dots and mass next to float32
    ones. Each batch row counts, per memory row, the floored picks as recorded and the weighed
    ones whose float64 softmax weight (of the values as stored) reaches the floor."""
    from services.generator.citations import stack_picks

    rng = np.random.default_rng(9)
    B, H, k, rows_n, floor = 3, 4, 5, 30, 0.08

    def weighed(scale, dtype):
        rows = rng.integers(-1, rows_n, size=(B, H, 1, k)).astype(np.int32)
        dots = (rng.normal(size=(B, H, 1, k)) * 6).astype(dtype)
        mass = rng.uniform(0.1, 0.9, size=(B, H, 1)).astype(dtype)
        d64, m64 = dots.astype(np.float64), mass.astype(np.float64)
        logits = np.where(rows >= 0, d64 * scale, -np.inf)
        e = np.where(rows >= 0, np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
        w = e / e.sum(-1, keepdims=True) * m64[..., None]
        p = Picks(mx.array(rows), mx.array(dots), mx.array(mass), scale)
        return p, rows, w

    forwards, want = [], [[] for _ in range(B)]
    close, kept = [], []
    for step in range(4):
        fwd = []
        if step % 2 == 0:  # the fused kernel's: floored rows, layer by layer
            for _ in range(3):
                rows = rng.integers(-1, rows_n, size=(B, H, 1, k)).astype(np.int32)
                fwd.append(Picks(mx.array(rows)))
                for b in range(B):
                    want[b] += list(rows[b].ravel())
        else:  # the portable path's: weighed, two scales, compacted or not, float16 or float32
            layers = [weighed(0.25, np.float32), weighed(0.25, np.float32), weighed(0.5, np.float16)]
            for _, rows, w in layers:
                close.append(np.abs(w[rows >= 0] - floor).min())
                kept.append((w[rows >= 0] >= floor).mean())
                for b in range(B):
                    want[b] += list(np.where(w[b] >= floor, rows[b], -1).ravel())
            picks = [p for p, _, _ in layers]
            fwd = stack_picks(picks[:2]) + picks[2:] if step == 1 else picks
        forwards.append(fwd)
    assert min(close) > 1e-5, "a weight lies at the floor: draw others"  # float32 rounds ~1e-7
    assert 0 < min(kept) and max(kept) < 1  # every layer keeps some picks and drops some
    assert len(forwards[1]) == 2 and forwards[1][0].rows.ndim == 5  # the first two layers stacked
    got = np.array(picked_rows(forwards, min_weight=floor))
    assert got.shape == (B, len(want[0]))
    for b in range(B):
        np.testing.assert_array_equal(
            np.bincount(got[b] + 1, minlength=rows_n + 1), np.bincount(np.array(want[b]) + 1, minlength=rows_n + 1)
        )
