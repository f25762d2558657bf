"""Solo decode (services/generator/solo.py): a request decoding alone in its group is stepped by
mlx-lm's generate_step, and goes back into the group's BatchGenerator when another request joins.
Whatever a request asks, it gets the same tokens, logprobs, stops, citations and counted forwards
as when it is batched throughout."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from dataclasses import replace

import numpy as np
import pytest

from extmind import errors
from services.generator import attention_mass, decode_group, in_flight, solo
from services.generator import scheduler as sched
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.request_types import LOCAL, REMOTE, Chunk, GenerationRequest, MemoryOptions, Sampling

from .helpers import run as run_to_end
from .helpers import until_work_waits
from .memory_helpers import assert_counts_match, assert_decidable, ref_memory, row_hits
from .np_reference import Retrievals

ALONG = "Water boils at"  # the prompt of the other request


async def run(engine, req):
    """-> (token ids, logprobs, text, Final, the top logprobs' token ids per step)."""
    tops = []

    def keep(ev):
        if isinstance(ev, Chunk):
            tops.extend([t for t, _ in step] for step in ev.top_logprobs)
        return ev

    class Tapped:
        def generate(self, r):
            return (keep(ev) async for ev in engine.generate(r))

    return (*await run_to_end(Tapped(), req), tops)


SOLO_AFTER = 2  # the tests' Scheduler.SOLO_AFTER: a request goes solo at its 4th token


@pytest.fixture
def handovers(monkeypatch):
    """Counts the scheduler's hand-overs: to solo ("solo", and the tokens the request had made
    then: "at") and back into a batch ("resume"). Sequences go solo after SOLO_AFTER steps alone;
    none starts solo from its prompt (test_solo_from_prompt.py), so plain requests take the hand-over."""
    monkeypatch.setattr(sched.Scheduler, "SOLO_AFTER", SOLO_AFTER)
    monkeypatch.setattr(sched.Scheduler, "SOLO_FROM_PROMPT", False)
    seen = {"solo": 0, "resume": 0, "at": []}
    go_solo, resume = sched.Scheduler._go_solo, decode_group.DecodeGroup.resume

    def counted_go_solo(self, group, r):
        seen["solo"] += 1
        seen["at"].append(r.generated)
        go_solo(self, group, r)

    def counted_resume(group):
        seen["resume"] += 1
        resume(group)

    monkeypatch.setattr(sched.Scheduler, "_go_solo", counted_go_solo)
    monkeypatch.setattr(decode_group.DecodeGroup, "resume", counted_resume)
    return seen


async def joined(engine, req, other, monkeypatch, at: int = 6):
    """Runs ``req``; once it has made ``at`` tokens (decoding solo), ``other`` joins it. Until
    ``other`` is admitted, ``req`` makes no token while nothing else waits for the MLX thread,
    so it cannot finish first. -> (run(req), run(other))."""
    reached, admitted = threading.Event(), threading.Event()
    on_token, admit = in_flight.InFlight.on_token, sched.Scheduler.admit

    def holding(self, r, resp):
        on_token(self, r, resp)
        if r.req is req and r.generated >= at and not admitted.is_set():
            reached.set()
            until_work_waits(engine.mlx)

    def admitting(self, r, *args):
        admit(self, r, *args)
        if r.req is other:
            admitted.set()

    monkeypatch.setattr(in_flight.InFlight, "on_token", holding)
    monkeypatch.setattr(sched.Scheduler, "admit", admitting)
    first = asyncio.create_task(run(engine, req))
    assert await asyncio.to_thread(reached.wait, 30)
    second = asyncio.create_task(run(engine, other))
    out = await first, await second
    assert admitted.is_set()
    monkeypatch.setattr(in_flight.InFlight, "on_token", on_token)
    monkeypatch.setattr(sched.Scheduler, "admit", admit)
    return out


async def batched(engine, req, other):
    """Runs ``req`` next to ``other`` (admitted together, ``other`` longer): batched throughout."""
    return await asyncio.gather(run(engine, req), run(engine, other))


def same_steps(a, b):
    """Two runs' tokens are equal and their logprobs agree to rounding (a batch of two and a
    single sequence may round differently)."""
    assert a[0] == b[0]
    np.testing.assert_allclose(a[1], b[1], rtol=0, atol=1e-4)
    assert a[2] == b[2] and a[3].finish_reason == b[3].finish_reason and a[4] == b[4]
    assert a[3].completion_tokens == b[3].completion_tokens


SAMPLINGS = {
    "greedy": Sampling(max_tokens=24),
    "repetition_penalty": Sampling(max_tokens=24, repetition_penalty=1.5),
    "seeded": Sampling(temperature=1.0, top_p=0.9, top_k=50, repetition_penalty=1.3, seed=7, max_tokens=24),
}


@pytest.mark.parametrize("name", list(SAMPLINGS))
async def test_solo_joined_and_batched_give_the_same_tokens(plain_engine, handovers, monkeypatch, name):
    """The same request alone (solo from its second token), joined mid-stream by another (back to
    a batch, then solo again once that one ends) and batched throughout: the same tokens,
    logprobs and top logprobs. A seeded sampler draws the same tokens (the forward recomputed at
    a hand-over does not draw twice), and the repetition penalty sees the whole history."""
    engine = plain_engine
    req = GenerationRequest(
        engine.tokenizer.encode("Alice met Bob at the"), SAMPLINGS[name], return_logprobs=True, top_logprobs=3
    )
    short = GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=5))
    long = GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=40))

    alone = await run(engine, req)
    assert handovers == {"solo": 1, "resume": 0, "at": [SOLO_AFTER + 1]}
    assert len(alone[0]) >= 12  # long enough to be joined at its 6th token and outlive the other

    a, b = await joined(engine, req, short, monkeypatch)
    assert handovers["resume"] == 1 and handovers["solo"] >= 3  # left when joined, solo again after
    assert b[3].completion_tokens == 5
    same_steps(alone, a)

    before = dict(handovers)
    c, _ = await batched(engine, req, long)
    assert handovers["resume"] == before["resume"]  # the long one outlives req: req never went solo
    same_steps(alone, c)

    assert engine.stats()["active"] == 0


async def test_stop_string_and_length_while_solo_and_after_rejoining(plain_engine, handovers, monkeypatch):
    """A stop string met while decoding solo ends the request as it does batched (same text, same
    reason); so does max_tokens."""
    engine = plain_engine
    prompt = engine.tokenizer.encode("The river flows to")
    _, _, text, _, _ = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=30)))
    tail = text[len(text) * 2 // 3 :]
    stop = next(tail[i : i + 3] for i in range(len(tail)) if tail[i : i + 3].strip() == tail[i : i + 3])
    req = GenerationRequest(prompt, Sampling(max_tokens=30, stop=(stop,)))
    alone = await run(engine, req)
    assert alone[3].finish_reason == "stop_sequence" and alone[2] == text[: text.find(stop)]
    short = GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=4))
    a, _ = await joined(engine, req, short, monkeypatch)
    assert handovers["resume"] == 1
    assert (a[0], a[2], a[3].finish_reason) == (alone[0], alone[2], alone[3].finish_reason)
    b, _ = await batched(engine, req, GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=40)))
    assert (b[0], b[2], b[3].finish_reason) == (alone[0], alone[2], alone[3].finish_reason)
    assert engine.stats()["active"] == 0


async def test_a_request_goes_solo_after_decoding_alone_for_a_while(plain_engine, monkeypatch):
    """With the default SOLO_AFTER, a request goes solo once it has decoded alone for SOLO_AFTER
    batch steps and may still make SOLO_AFTER tokens: one that may make fewer never does."""
    after = sched.Scheduler.SOLO_AFTER
    monkeypatch.setattr(sched.Scheduler, "SOLO_FROM_PROMPT", False)
    at = []
    go_solo = sched.Scheduler._go_solo
    monkeypatch.setattr(sched.Scheduler, "_go_solo", lambda self, g, r: at.append(r.generated) or go_solo(self, g, r))
    prompt = plain_engine.tokenizer.encode("Alice met Bob at the")
    short = await run(plain_engine, GenerationRequest(prompt, Sampling(max_tokens=2 * after)))
    assert at == [] and len(short[0]) == 2 * after
    long = await run(plain_engine, GenerationRequest(prompt, Sampling(max_tokens=2 * after + 1)))
    assert at == [after + 1] and long[0][: 2 * after] == short[0]


async def test_the_batch_caches_a_sequence_left_are_freed_while_it_decodes_solo(plain_engine, monkeypatch):
    """Going solo copies the sequence's keys and values out of the decode batch's BatchKVCaches
    (one per layer): those are dropped, not kept alive next to the copy for as long as the
    sequence decodes solo (a long context's cache held twice)."""
    monkeypatch.setattr(sched.Scheduler, "SOLO_AFTER", SOLO_AFTER)
    monkeypatch.setattr(sched.Scheduler, "SOLO_FROM_PROMPT", False)
    left, alive = [], []
    go_solo, step_solo = sched.Scheduler._go_solo, sched.Scheduler._step_solo

    def going(self, group, r):
        left.extend(weakref.ref(c) for c in group.gen._generation_batch.prompt_cache)
        go_solo(self, group, r)

    def stepping(self, group):
        step_solo(self, group)
        gc.collect()
        alive.append(sum(c() is not None for c in left))

    monkeypatch.setattr(sched.Scheduler, "_go_solo", going)
    monkeypatch.setattr(sched.Scheduler, "_step_solo", stepping)
    got = await run(plain_engine, GenerationRequest(plain_engine.tokenizer.encode("The sea"), Sampling(max_tokens=12)))
    assert len(got[0]) == 12 and len(left) == plain_engine.num_layers
    assert alive == [0] * (12 - SOLO_AFTER - 1)  # solo from its 4th token on


async def test_cancelled_while_solo(plain_engine, handovers):
    """A request cancelled (its stream closed) while decoding solo frees its slot; the next
    request of the group decodes as it does alone."""
    engine = plain_engine
    req = GenerationRequest(engine.tokenizer.encode("The sea"), Sampling(max_tokens=10_000))
    gen = engine.generate(req)
    got = 0
    async for _ in gen:
        got += 1
        if got == 5:
            break
    await gen.aclose()
    for _ in range(200):  # the empty group goes at the scheduler's next pass
        if engine.stats() == dict(engine.stats(), active=0, groups=0):
            break
        await asyncio.sleep(0.01)
    assert engine.stats() == dict(engine.stats(), active=0, groups=0)
    assert handovers["solo"] == 1
    again = GenerationRequest(engine.tokenizer.encode("The sea"), Sampling(max_tokens=8))
    long = replace(again, sampling=Sampling(max_tokens=30))
    assert (await run(engine, again))[0] == (await batched(engine, again, long))[0][0]


async def test_stopping_the_engine_fails_a_solo_request(llama_path, handovers):
    """close_all while a request decodes solo: the request gets UNAVAILABLE."""
    engine = GeneratorEngine(EngineConfig(model=str(llama_path)))
    engine.start()
    try:
        gen = engine.generate(GenerationRequest(engine.tokenizer.encode("The sea"), Sampling(max_tokens=100_000)))
        for _ in range(5):  # the 4th token is a solo step's
            assert isinstance(await gen.__anext__(), Chunk)
        assert handovers["solo"] == 1
        await asyncio.to_thread(engine.stop)
        with pytest.raises(errors.Unavailable):
            async for _ in gen:
                pass
    finally:
        engine.stop()


async def test_citations_and_counted_forwards_are_the_same_solo_and_joined(engine, memory, ref, handovers, monkeypatch):
    """A citing request run alone (solo from its second token) and joined mid-stream by another
    of its group (back to a batch, solo again after): the same tokens, per-row counts equal to
    the numpy model's retrievals at its steps (tie-aware: a batch of two and a single sequence
    may round a top-k boundary tie either way), and every forward counted once - layers x heads x
    top_k picks per generated token (the forward of the last prompt token and of every token but
    the last) - with as many attention mass steps as tokens. A forward recomputed at a hand-over
    is not counted twice, nor one left out in its place."""
    mid, tokens = memory
    bank, _ = ref_memory(ref, tokens, engine.special_ids)
    top_k, n = 3, 20
    opts = MemoryOptions((mid,), top_k=top_k, return_citations=True, max_citations=1000, citation_min_weight=0.0)
    steps = []
    means = attention_mass.MassSum.means
    monkeypatch.setattr(attention_mass.MassSum, "means", lambda self: steps.append(self.steps) or means(self))
    prompt = engine.tokenizer.encode("Alice met Bob at")
    req = GenerationRequest(prompt, Sampling(max_tokens=n), opts)
    other = GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=5), opts)
    want_hits, margins = Retrievals(), []
    want, _ = ref.greedy(prompt, n, memory=bank, top_k=top_k, hits=want_hits, margins=margins)
    assert_decidable(margins)

    alone = await run(engine, req)
    assert handovers == {"solo": 1, "resume": 0, "at": [SOLO_AFTER + 1]}
    a, b = await joined(engine, req, other, monkeypatch)
    assert handovers["resume"] == 1 and handovers["solo"] >= 3
    per_token = engine.num_layers * engine.num_heads * top_k
    for got, fin in (alone[0], alone[3]), (a[0], a[3]):
        assert got == want and fin.completion_tokens == n
        assert int(fin.row_counts.sum()) == per_token * n
        assert_counts_match(row_hits(fin, tokens, engine.tokenizer), want_hits)
    assert int(b[3].row_counts.sum()) == per_token * b[3].completion_tokens
    # alone, then the joined pair in the order they ended (the other one first)
    assert steps == [n, 5, n]


async def test_a_tally_that_fails_as_a_solo_request_goes_back_ends_that_request_alone(
    engine, memory, handovers, monkeypatch
):
    """Going back into the batch first hands the solo request's pending forwards to its tallies.
    Should that raise (BatchTally.flush keeps the records), that request ends with INTERNAL (its
    counts would be short) and nothing else does: the request that joined runs, as does one of
    another group; the request is not left out of both the solo and the batch (waiting forever,
    or crashing the scheduler, which fails every request of every group)."""
    mid, _ = memory
    opts = MemoryOptions((mid,), top_k=3, return_citations=True, citation_min_weight=0.0)
    req = GenerationRequest(engine.tokenizer.encode("Alice met Bob at"), Sampling(max_tokens=20), opts)
    other = GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=5), opts)
    bystander = GenerationRequest(engine.tokenizer.encode("The sea"), Sampling(max_tokens=60))
    resume = decode_group.DecodeGroup.resume

    def failing(group):
        combine = group.counts.combine

        def once(forwards):
            group.counts.combine = combine
            raise RuntimeError("combine failed")

        group.counts.combine = once
        resume(group)

    monkeypatch.setattr(decode_group.DecodeGroup, "resume", failing)
    reached, on_token = threading.Event(), in_flight.InFlight.on_token

    def holding(self, r, resp):  # as joined() does: req makes no token more until other is admitted
        on_token(self, r, resp)
        if r.req is req and r.generated == 6:
            reached.set()
            until_work_waits(engine.mlx)

    monkeypatch.setattr(in_flight.InFlight, "on_token", holding)
    aside = asyncio.create_task(run(engine, bystander))
    first = asyncio.create_task(run(engine, req))
    assert await asyncio.to_thread(reached.wait, 30)
    second = asyncio.create_task(run(engine, other))
    with pytest.raises(errors.Internal, match="combine failed"):
        await asyncio.wait_for(first, 60)
    assert handovers["resume"] == 1
    assert (await asyncio.wait_for(second, 60))[3].completion_tokens == 5
    assert (await asyncio.wait_for(aside, 60))[3].completion_tokens == 60
    assert engine.stats()["active"] == 0
    monkeypatch.setattr(in_flight.InFlight, "on_token", on_token)
    assert (await run(engine, req))[3].completion_tokens == 20


@pytest.mark.parametrize(("mode", "layers"), [(REMOTE, ()), (LOCAL, (1,)), (REMOTE, (0,))])
async def test_remote_retrieval_and_a_layer_subset_solo_and_joined(
    engine, memory, handovers, monkeypatch, mode, layers
):
    """REMOTE retrieval (one search per layer and forward, the repeated forward's too) and a
    subset of retrieving layers (fewer records per forward): alone (solo from its 4th token) and
    joined mid-stream, the same tokens and every forward counted once, in both requests."""
    mid, _ = memory
    top_k, n = 3, 16
    opts = MemoryOptions((mid,), top_k=top_k, mode=mode, layers=layers, return_citations=True, citation_min_weight=0.0)
    steps = []
    means = attention_mass.MassSum.means
    monkeypatch.setattr(attention_mass.MassSum, "means", lambda self: steps.append(self.steps) or means(self))
    req = GenerationRequest(engine.tokenizer.encode("Alice met Bob at"), Sampling(max_tokens=n), opts)
    other = GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=5), opts)
    alone = await run(engine, req)
    a, b = await joined(engine, req, other, monkeypatch)
    assert handovers["solo"] >= 3 and handovers["resume"] == 1
    per_token = len(layers or range(engine.num_layers)) * engine.num_heads * top_k
    assert a[0] == alone[0] and len(a[0]) == n
    for fin in alone[3], a[3], b[3]:
        assert int(fin.row_counts.sum()) == per_token * fin.completion_tokens
    assert steps == [n, 5, n]


async def test_a_solo_step_that_raises_fails_its_request_only(plain_engine, handovers, monkeypatch):
    """A solo step that raises (as a REMOTE search whose memory service went away would) ends its
    request with INTERNAL, as a failing batch step does, and the next request decodes as it does
    alone."""
    engine = plain_engine
    step = solo.Solo.step
    calls = []

    def failing(self):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("search failed")
        return step(self)

    req = GenerationRequest(engine.tokenizer.encode("The sea"), Sampling(max_tokens=20))
    alone = await run(engine, req)
    monkeypatch.setattr(solo.Solo, "step", failing)
    with pytest.raises(errors.Internal, match="search failed"):
        await run(engine, req)
    assert handovers["solo"] == 2
    monkeypatch.setattr(solo.Solo, "step", step)
    assert (await run(engine, req))[0] == alone[0]
    assert engine.stats()["active"] == 0
