"""A request without memories that finds its group empty starts solo from its prompt
(``Solo.from_prompt``: mlx-lm's ``generate_step`` prefills it), so a lone stream never pays the
batch steps and the hand-over. Whether it stays alone, is joined mid-stream (back into a batch
with its cache) or is joined before its first step (into the batch as a prompt), it gets the
tokens, logprobs and top logprobs it gets batched throughout."""

from __future__ import annotations

import asyncio

import pytest

from services.generator import decode_group, solo
from services.generator import scheduler as sched
from services.generator.request_types import GenerationRequest, MemoryOptions, Sampling

from .helpers import MlxHold, first_steps_queued, queued, stock_steps
from .test_solo_decode import ALONG, SAMPLINGS, joined, run, same_steps


@pytest.fixture
def seen(monkeypatch):
    """Counts solos made from a prompt ("fresh"), hand-overs to solo ("solo") and resumes of a
    started solo ("resume") or of one joined before its first step ("unstarted")."""
    counts = {"fresh": 0, "solo": 0, "resume": 0, "unstarted": 0}
    from_prompt, go_solo, resume = solo.Solo.from_prompt, sched.Scheduler._go_solo, decode_group.DecodeGroup.resume

    def fresh(cls, *a, **kw):
        counts["fresh"] += 1
        return from_prompt(*a, **kw)

    def going(self, group, r):
        counts["solo"] += 1
        go_solo(self, group, r)

    def resuming(group):
        counts["resume" if group.solo.started else "unstarted"] += 1
        resume(group)

    monkeypatch.setattr(solo.Solo, "from_prompt", classmethod(fresh))
    monkeypatch.setattr(sched.Scheduler, "_go_solo", going)
    monkeypatch.setattr(decode_group.DecodeGroup, "resume", resuming)
    monkeypatch.setattr(sched.Scheduler, "SOLO_AFTER", 2)
    return counts


async def together(engine, *reqs):
    """Runs ``reqs`` admitted back to back before any step: the MLX thread is held until every
    admit waits for it."""
    hold = MlxHold(engine)
    await hold.started()  # until the thread takes it, the hold itself counts as waiting
    tasks = [asyncio.create_task(run(engine, r)) for r in reqs]
    await queued(engine, len(reqs))  # the admits, queued behind the hold
    hold.release()
    await hold.done()
    return await asyncio.gather(*tasks)


@pytest.mark.parametrize("name", list(SAMPLINGS))
async def test_from_prompt_alone_joined_and_batched_give_the_same_tokens(plain_engine, seen, monkeypatch, name):
    engine = plain_engine
    req = GenerationRequest(
        engine.tokenizer.encode("Alice met Bob at the"), SAMPLINGS[name], return_logprobs=True, top_logprobs=3
    )
    alone = await run(engine, req)
    assert seen == {"fresh": 1, "solo": 0, "resume": 0, "unstarted": 0} and len(alone[0]) >= 12

    # joined at its 6th token: back into a batch with its cache, solo again once the other ends
    a, b = await joined(
        engine, req, GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=5)), monkeypatch
    )
    assert seen["fresh"] == 2 and seen["resume"] == 1 and seen["solo"] >= 1 and b[3].completion_tokens == 5
    same_steps(alone, a)

    # joined before its first step: into the batch as a prompt, batched throughout
    long = GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=40))
    before = dict(seen)
    c, _ = await together(engine, req, long)
    assert seen["fresh"] == before["fresh"] + 1 and seen["unstarted"] == before["unstarted"] + 1
    assert seen["resume"] == before["resume"]  # (the longer one goes solo once req has ended)
    same_steps(alone, c)
    assert engine.stats()["active"] == 0


async def test_a_lone_greedy_request_is_stock_generate_step_bit_for_bit(plain_engine, seen):
    """Solo from its prompt, a request is mlx-lm's generate_step on the same model: the same
    tokens and the same logprobs to the bit (batched, logprobs may round differently)."""
    engine = plain_engine
    prompt = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. Paris is")
    tokens, lps, _, final, _ = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=16), None, True))
    assert seen["fresh"] == 1
    want = stock_steps(engine, prompt, 16, engine.config.prefill_step_size)
    assert len(tokens) >= 8 and tokens == [t for t, _ in want] and lps == [lp for _, lp in want]
    assert final.completion_tokens >= len(tokens)


async def test_a_request_with_memories_is_prefilled_in_its_batch_first(engine, memory, seen):
    """Only a group without memories starts a request solo from its prompt: a request with
    memories is prefilled by its group's BatchGenerator (whose prefill forwards the memory
    context and tallies follow) and goes solo after SOLO_AFTER steps alone."""
    mid, _ = memory
    req = GenerationRequest(
        engine.tokenizer.encode("Alice met Bob at"), Sampling(max_tokens=8), MemoryOptions((mid,), top_k=3)
    )
    got = await run(engine, req)
    assert len(got[0]) == 8 and seen["fresh"] == 0 and seen["solo"] == 1


async def test_requests_admitted_while_its_first_step_is_queued_share_the_batch_prefill(
    plain_engine, seen, monkeypatch
):
    """A request started solo whose first step comes before the admits of requests that arrived
    with it (the scheduler's run of steps was queued between them) puts that step off once: the
    others join before its prefill and all are prefilled as one batch (no started solo to resume,
    and no prompt chunk of it run solo only to be computed again in the batch)."""
    engine = plain_engine
    chunks, prefill = [], solo.Solo.prefill
    monkeypatch.setattr(solo.Solo, "prefill", lambda self: chunks.append(1) or prefill(self))
    a_req = GenerationRequest(engine.tokenizer.encode("The sea"), Sampling(max_tokens=12))
    a, hold = await first_steps_queued(engine, lambda: asyncio.create_task(run(engine, a_req)))
    b = asyncio.create_task(run(engine, GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=12))))
    await queued(engine, 2)  # and b's admit behind them
    hold.release()
    await hold.done()
    got_a, got_b = await a, await b
    assert len(got_a[0]) == len(got_b[0]) == 12
    assert seen["fresh"] == 1 and seen["unstarted"] == 1 and seen["resume"] == 0 and chunks == []
