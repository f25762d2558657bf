"""Edges of a request with memories that starts solo from its prompt (scheduler.py ``admit`` /
``_step_solo``, solo.py): what it counts (citations, attention-mass steps) must be what the same
request counts batched throughout (``Scheduler.SOLO_FROM_PROMPT`` off, no hand-over to solo),
whatever ends it or joins it, and it must end once."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from services.generator import attention_mass, decode_group, in_flight, solo
from services.generator import scheduler as sched
from services.generator.request_types import LOCAL, REMOTE, STOP_SEQUENCE, GenerationRequest, MemoryOptions, Sampling

from .helpers import until_work_waits
from .memory_helpers import assert_counts_match, assert_decidable, ref_memory, row_hits
from .np_reference import Retrievals
from .test_solo_decode import ALONG, joined, run
from .test_solo_from_prompt import together

PROMPT = "Alice met Bob at"


def counted_steps(monkeypatch) -> list:
    """The attention-mass steps of every request that ends, in the order they end."""
    steps, means = [], attention_mass.MassSum.means
    monkeypatch.setattr(attention_mass.MassSum, "means", lambda self: steps.append(self.steps) or means(self))
    return steps


def batched_throughout(monkeypatch) -> None:
    monkeypatch.setattr(sched.Scheduler, "SOLO_FROM_PROMPT", False)
    monkeypatch.setattr(sched.Scheduler, "SOLO_AFTER", 10_000)


def idle(engine) -> None:
    assert engine.stats()["active"] == 0 and engine.mlx.call(lambda: engine._scheduler._flight.active) == 0


def same_counts(a, b) -> None:
    assert a[0] == b[0] and a[3].finish_reason == b[3].finish_reason
    assert a[3].completion_tokens == b[3].completion_tokens
    np.testing.assert_array_equal(a[3].row_counts, b[3].row_counts)


async def cancelled(engine, task) -> None:
    """Cancels ``task`` (a request's run) and waits until the engine has no request left: the
    cancel is submitted to the MLX thread as the stream closes."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    deadline = time.monotonic() + 30
    while engine.mlx.call(lambda: engine._scheduler._flight.active) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    idle(engine)


async def counts_as_batched(engine, mid, monkeypatch) -> None:
    """The next request of the group, alone, counts what it counts batched throughout: nothing of
    an earlier one was left over in the group's tallies."""
    req = GenerationRequest(engine.tokenizer.encode(PROMPT), Sampling(max_tokens=6), opts(mid))
    alone = await run(engine, req)
    batched_throughout(monkeypatch)
    same_counts(alone, await run(engine, req))
    idle(engine)


async def alone_then_batched(engine, req, monkeypatch):
    """Runs ``req`` alone, then batched throughout, and checks they count the same (tokens, end,
    row counts). -> (the alone run, the attention-mass steps of both runs in order)."""
    steps = counted_steps(monkeypatch)
    alone = await run(engine, req)
    idle(engine)
    batched_throughout(monkeypatch)
    batched = await run(engine, req)
    idle(engine)
    same_counts(alone, batched)
    return alone, steps


def opts(mid, **kw) -> MemoryOptions:
    kw = {"top_k": 3, "return_citations": True, "max_citations": 1000, "citation_min_weight": 0.0, **kw}
    return MemoryOptions((mid,), **kw)


@pytest.mark.parametrize(
    "case",
    [
        *["one", "two", "stop_first", "stop_second", "seeded", "floor", "floor_subset", "masked", "masked_floor"],
        *["remote_one", "remote_floor_subset"],
    ],
)
async def test_solo_from_prompt_counts_what_a_batch_counts(engine, memory, monkeypatch, case):
    """Started solo from its prompt, a citing request counts the citations and attention-mass
    steps it counts batched throughout, to the row: one or two tokens, a stop string on its first
    or second token (its first token's forward counted before the stop ends it), seeded sampling,
    a citation floor (all layers or one), a threshold that masks every pick (with a floor too),
    REMOTE retrieval."""
    mid, _ = memory
    prompt = engine.tokenizer.encode(PROMPT)
    sampling, mem = Sampling(max_tokens=8), opts(mid)
    if case == "one":
        sampling = Sampling(max_tokens=1)
    elif case == "two":
        sampling = Sampling(max_tokens=2)
    elif case == "seeded":
        sampling = Sampling(temperature=1.0, top_p=0.9, seed=11, max_tokens=8)
    elif case == "floor":
        mem = opts(mid, citation_min_weight=0.1)
    elif case == "floor_subset":
        mem = opts(mid, citation_min_weight=0.1, layers=(1,))
    elif case == "masked":
        mem = opts(mid, threshold=0.9999)
    elif case == "masked_floor":
        mem = opts(mid, threshold=0.9999, citation_min_weight=0.1)
    elif case == "remote_one":
        sampling, mem = Sampling(max_tokens=1), opts(mid, mode=REMOTE)
    elif case == "remote_floor_subset":
        mem = opts(mid, mode=REMOTE, citation_min_weight=0.1, layers=(0,))
    if case.startswith("stop"):
        first = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=2), mem))
        at = 0 if case == "stop_first" else 1
        text = engine.tokenizer.decode(first[0][at : at + 1]).strip()
        assert text, "the token is blank: no stop string to make of it"
        sampling = Sampling(max_tokens=8, stop=(text,))
    req = GenerationRequest(prompt, sampling, mem)
    alone, steps = await alone_then_batched(engine, req, monkeypatch)
    assert steps[0] == steps[1] >= 1
    per_token = len(mem.layers or range(engine.num_layers)) * engine.num_heads * mem.top_k
    total = int(alone[3].row_counts.sum())
    if case.startswith("masked"):
        assert total == 0
    elif "floor" in case:
        assert 0 < total < per_token * steps[0]
    else:
        assert total == per_token * steps[0] == per_token * alone[3].completion_tokens
    if case.startswith("stop"):
        assert alone[3].finish_reason == STOP_SEQUENCE and steps[0] == (1 if case == "stop_first" else 2)


async def test_two_groups_started_solo_together_count_as_alone(engine, memory, monkeypatch):
    """Two requests of two groups (other top-k) admitted together: each starts solo from its
    prompt in its own group, and counts what it counts run alone, batched throughout."""
    mid, _ = memory
    prompt = engine.tokenizer.encode(PROMPT)
    a = GenerationRequest(prompt, Sampling(max_tokens=6), opts(mid, top_k=3))
    b = GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=9), opts(mid, top_k=2))
    made = []
    from_prompt = solo.Solo.from_prompt
    monkeypatch.setattr(
        solo.Solo, "from_prompt", classmethod(lambda cls, *x, **k: made.append(1) or from_prompt(*x, **k))
    )
    got_a, got_b = await together(engine, a, b)
    assert len(made) == 2
    idle(engine)
    batched_throughout(monkeypatch)
    same_counts(got_a, await run(engine, a))
    same_counts(got_b, await run(engine, b))
    idle(engine)


@pytest.mark.parametrize("citing_first", [True, False])
async def test_a_citing_and_a_non_citing_request_of_one_group(engine, memory, monkeypatch, citing_first):
    """One of them starts solo from its prompt, the other joins it mid-stream: the citing one
    counts what it counts alone, batched throughout; the other counts nothing."""
    mid, _ = memory
    cite, plain = opts(mid), opts(mid, return_citations=False)
    long, short = Sampling(max_tokens=14), Sampling(max_tokens=5)
    first = GenerationRequest(engine.tokenizer.encode(PROMPT), long, cite if citing_first else plain)
    second = GenerationRequest(engine.tokenizer.encode(ALONG), short, plain if citing_first else cite)
    monkeypatch.setattr(sched.Scheduler, "SOLO_AFTER", 2)
    x, y = await joined(engine, first, second, monkeypatch)
    idle(engine)
    (got, req), other = ((x, first), y) if citing_first else ((y, second), x)
    assert other[3].row_counts is None
    batched_throughout(monkeypatch)
    same_counts(got, await run(engine, req))
    idle(engine)


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("seeded", [False, True])
async def test_joined_right_after_its_first_step(engine, memory, monkeypatch, n, seeded):
    """Joined once its first step made its first token (the last prompt token's forward counted
    before that token, the first token's after it): back into the batch, it counts every forward
    once, as batched throughout."""
    mid, _ = memory
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=5, max_tokens=n) if seeded else Sampling(max_tokens=n)
    req = GenerationRequest(engine.tokenizer.encode(PROMPT), sampling, opts(mid))
    other = GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=4), opts(mid))
    steps = counted_steps(monkeypatch)
    resumed, resume = [], decode_group.DecodeGroup.resume
    monkeypatch.setattr(decode_group.DecodeGroup, "resume", lambda g: resumed.append(g.solo.started) or resume(g))
    a, b = await joined(engine, req, other, monkeypatch, at=1)
    assert resumed[0] is True  # joined a solo that made its first token, not one still in its prompt
    idle(engine)
    batched_throughout(monkeypatch)
    want = await run(engine, req)
    same_counts(a, want)
    per_token = engine.num_layers * engine.num_heads * 3
    assert int(a[3].row_counts.sum()) == per_token * n and int(b[3].row_counts.sum()) == per_token * 4
    assert sorted(steps[:2]) == sorted([4, n]) and steps[2] == n


async def test_cancelled_between_its_prefill_chunks(engine, memory, monkeypatch):
    """A request with memories cancelled while its prompt is prefilled solo, chunk by chunk: it
    ends once, and the next request of its group counts what it counts alone."""
    mid, _ = memory
    monkeypatch.setattr(engine._scheduler, "prefill_step_size", 3)
    chunked, prefill = threading.Event(), solo.Solo.prefill

    def prefilling(self):
        prefill(self)
        if not chunked.is_set():
            chunked.set()
            until_work_waits(engine.mlx)

    stepped, step = [], solo.Solo.step
    monkeypatch.setattr(solo.Solo, "prefill", prefilling)
    monkeypatch.setattr(solo.Solo, "step", lambda self: stepped.append(self.request.req) or step(self))
    long = GenerationRequest(
        engine.tokenizer.encode(PROMPT + " the market, then " + ALONG), Sampling(max_tokens=8), opts(mid)
    )
    assert len(long.prompt_tokens) > 3 * 3  # chunks left after the first
    task = asyncio.create_task(run(engine, long))
    assert await asyncio.to_thread(chunked.wait, 30)
    await cancelled(engine, task)
    assert long not in stepped  # cancelled within its prefill
    await counts_as_batched(engine, mid, monkeypatch)


async def test_joined_between_its_prefill_chunks(engine, memory, ref, monkeypatch):
    """Another request of its group joins while its prompt is prefilled solo, chunk by chunk:
    into the batch as a prompt (the chunks prefilled solo computed again there, recording
    nothing), it gets the numpy model's tokens and retrievals, every forward counted once in
    both requests."""
    mid, tokens = memory
    bank, _ = ref_memory(ref, tokens, engine.special_ids)
    monkeypatch.setattr(engine._scheduler, "prefill_step_size", 2)
    chunked, prefill = threading.Event(), solo.Solo.prefill
    resumed, resume = [], decode_group.DecodeGroup.resume

    def prefilling(self):
        prefill(self)
        if not chunked.is_set():
            chunked.set()
            until_work_waits(engine.mlx)

    monkeypatch.setattr(solo.Solo, "prefill", prefilling)
    monkeypatch.setattr(decode_group.DecodeGroup, "resume", lambda g: resumed.append(g.solo.started) or resume(g))
    n = 12
    prompt = engine.tokenizer.encode(PROMPT)
    assert len(prompt) > 2 * 2  # chunks left after the first
    want_hits, margins = Retrievals(), []
    want, _ = ref.greedy(prompt, n, memory=bank, top_k=3, hits=want_hits, margins=margins)
    assert_decidable(margins)
    steps = counted_steps(monkeypatch)
    first = asyncio.create_task(run(engine, GenerationRequest(prompt, Sampling(max_tokens=n), opts(mid))))
    assert await asyncio.to_thread(chunked.wait, 30)
    other = GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=5), opts(mid))
    second = asyncio.create_task(run(engine, other))
    a, b = await first, await second
    assert resumed == [False]  # joined before its first step
    per_token = engine.num_layers * engine.num_heads * 3
    assert a[0] == want and int(a[3].row_counts.sum()) == per_token * n
    assert_counts_match(row_hits(a[3], tokens, engine.tokenizer), want_hits)
    assert int(b[3].row_counts.sum()) == per_token * 5 and sorted(steps) == [5, n]
    idle(engine)


@pytest.mark.parametrize(("at", "mode"), [(1, LOCAL), (2, LOCAL), (3, LOCAL), (1, REMOTE), (2, REMOTE)])
async def test_joined_after_its_first_steps_seeded_with_a_penalty(engine, memory, monkeypatch, at, mode):
    """Joined once it made ``at`` tokens solo from its prompt (after the first token's forward
    alone, after generate_step's first step with its forward ahead, after a steady step), seeded
    with a repetition penalty, LOCAL or REMOTE: the tokens of a request alone, and every forward
    counted once."""
    mid, _ = memory
    n = 6
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=7, repetition_penalty=1.5, max_tokens=n)
    req = GenerationRequest(engine.tokenizer.encode(PROMPT), sampling, opts(mid, mode=mode))
    other = GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=4), opts(mid, mode=mode))
    alone = await run(engine, req)
    idle(engine)
    resumed, resume = [], decode_group.DecodeGroup.resume
    monkeypatch.setattr(
        decode_group.DecodeGroup, "resume", lambda g: resumed.append((g.solo.started, g.solo.ahead)) or resume(g)
    )
    a, b = await joined(engine, req, other, monkeypatch, at=at)
    assert resumed[0] == (True, at > 1)
    idle(engine)
    assert a[0] == alone[0]
    batched_throughout(monkeypatch)
    same_counts(a, await run(engine, req))
    per_token = engine.num_layers * engine.num_heads * 3
    assert int(a[3].row_counts.sum()) == per_token * a[3].completion_tokens
    assert int(b[3].row_counts.sum()) == per_token * 4
    idle(engine)


@pytest.mark.parametrize("at", [0, 1, 2])
async def test_an_end_token_as_its_first_second_or_third_token(engine, memory, monkeypatch, at):
    """Its ``at``-th token made an end token (the scheduler's and the BatchGenerator's): solo from
    its prompt it ends there and counts the citations and attention-mass steps it counts batched
    throughout."""
    mid, _ = memory
    prompt = engine.tokenizer.encode(PROMPT)
    req = GenerationRequest(prompt, Sampling(max_tokens=8), opts(mid))
    first = await run(engine, req)
    idle(engine)
    end = first[0][at]
    assert end not in first[0][:at]
    s = engine._scheduler
    monkeypatch.setattr(s, "eos_ids", [*s.eos_ids, end])
    monkeypatch.setattr(s, "_eos", frozenset([*s._eos, end]))
    alone, steps = await alone_then_batched(engine, req, monkeypatch)
    assert alone[3].finish_reason == "stop" and alone[3].completion_tokens == at + 1
    assert steps[0] == steps[1] == at + 1
    per_token = engine.num_layers * engine.num_heads * 3
    assert int(alone[3].row_counts.sum()) == per_token * (at + 1)


async def test_cancelled_between_its_first_and_second_step(engine, memory, monkeypatch):
    """A citing request cancelled once its first token is made solo from its prompt (before
    generate_step starts): it ends once, no second step runs, and the next request of its group
    counts what it counts batched throughout."""
    mid, _ = memory
    made, on_token = threading.Event(), in_flight.InFlight.on_token
    stepped, step = [], solo.Solo.step

    def holding(self, r, resp):
        on_token(self, r, resp)
        if r.req is long and r.generated == 1:
            made.set()
            until_work_waits(engine.mlx)  # the cancel

    monkeypatch.setattr(in_flight.InFlight, "on_token", holding)
    monkeypatch.setattr(solo.Solo, "step", lambda self: stepped.append(self.request.req) or step(self))
    long = GenerationRequest(engine.tokenizer.encode(PROMPT), Sampling(max_tokens=8), opts(mid))
    task = asyncio.create_task(run(engine, long))
    assert await asyncio.to_thread(made.wait, 30)
    await cancelled(engine, task)
    assert stepped.count(long) == 1  # the first step only
    await counts_as_batched(engine, mid, monkeypatch)
