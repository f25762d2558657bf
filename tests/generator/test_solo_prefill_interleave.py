"""A long prompt started solo from its prompt is prefilled one ``prefill_step_size`` chunk per
scheduler pass, as a BatchGenerator prefills it: the other groups keep decoding between its
chunks (and work queued on the MLX thread runs between them) rather than waiting for the whole
prompt in one step."""

from __future__ import annotations

import asyncio

import numpy as np

from services.generator import in_flight
from services.generator import scheduler as sched
from services.generator.request_types import Chunk, GenerationRequest, MemoryOptions, Sampling

from .helpers import stock_steps, until_work_waits
from .test_solo_decode import ALONG, run
from .test_solo_from_prompt import seen  # noqa: F401 - the fixture


async def test_other_groups_decode_between_the_chunks_of_a_solo_prefill(engine, memory, seen, monkeypatch):  # noqa: F811
    step = 16
    monkeypatch.setattr(engine._scheduler, "prefill_step_size", step)
    mid, _ = memory
    tokens_of, marks = {}, {}
    on_token = in_flight.InFlight.on_token

    def counting(self, r, resp):
        tokens_of[id(r.req)] = tokens_of.get(id(r.req), 0) + 1
        on_token(self, r, resp)

    admit = sched.Scheduler.admit

    def admitting(self, r, *a, **kw):
        admit(self, r, *a, **kw)
        marks["admitted"] = dict(tokens_of)

    monkeypatch.setattr(in_flight.InFlight, "on_token", counting)
    monkeypatch.setattr(sched.Scheduler, "admit", admitting)
    other = GenerationRequest(
        engine.tokenizer.encode("Water boils at"), Sampling(max_tokens=100_000), MemoryOptions((mid,), top_k=3)
    )
    stream = engine.generate(other)
    assert isinstance(await stream.__anext__(), Chunk)  # decoding in its own group
    long = engine.tokenizer.encode(" ".join([ALONG] * 40))[: step * 12 + 5]
    assert len(long) == step * 12 + 5
    chunks = (len(long) - 1 + step - 1) // step  # generate_step's prefill forwards before the last token

    first_at = {}

    def first(self, r, resp):
        counting(self, r, resp)
        if r.req is req and "first" not in first_at:
            first_at["first"] = dict(tokens_of)
            # the other still decoding then (had it ended, it could not make tokens in between)
            groups = engine._scheduler._groups.values()
            first_at["other running"] = any(x.req is other for g in groups for x in g.requests.values())

    monkeypatch.setattr(in_flight.InFlight, "on_token", first)
    req = GenerationRequest(long, Sampling(max_tokens=3))
    got = await run(engine, req)
    await stream.aclose()
    assert got[3].completion_tokens == 3 and seen["fresh"] == 2  # the other started solo too
    assert first_at["other running"]
    between = first_at["first"][id(other)] - marks["admitted"][id(other)]
    assert between >= chunks - 2, f"the other group made {between} tokens during a {chunks}-chunk prefill"
    for _ in range(200):
        if engine.stats()["active"] == 0:
            break
        await asyncio.sleep(0.01)


async def test_a_prompt_of_several_chunks_alone_is_generate_step_bit_for_bit(plain_engine, seen, monkeypatch):  # noqa: F811
    """Prefilled chunk by chunk across passes, a lone request is still mlx-lm's generate_step
    with the same prefill step: the same tokens and logprobs to the bit."""
    engine = plain_engine
    step = 16
    monkeypatch.setattr(engine._scheduler, "prefill_step_size", step)
    prompt = engine.tokenizer.encode(" ".join([ALONG] * 40))[: step * 5 + 3]
    tokens, lps, _, final, _ = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=12), None, True))
    assert seen["fresh"] == 1

    want = stock_steps(engine, prompt, 12, step)
    assert len(tokens) >= 4 and tokens == [t for t, _ in want] and lps == [lp for _, lp in want]


async def test_joined_within_its_prefill_it_is_batched_from_its_prompt(plain_engine, seen, monkeypatch):  # noqa: F811
    """Another request joins after some of a solo's prompt chunks ran, before its first token:
    the solo goes into the batch as a prompt (what it prefilled is dropped) and makes the tokens
    it makes alone."""
    import threading

    from services.generator import solo

    engine = plain_engine
    step = 16
    monkeypatch.setattr(engine._scheduler, "prefill_step_size", step)
    prompt = engine.tokenizer.encode(" ".join([ALONG] * 40))[: step * 6 + 3]
    req = GenerationRequest(prompt, Sampling(max_tokens=10), return_logprobs=True, top_logprobs=2)
    alone = await run(engine, req)
    reached, calls = threading.Event(), []
    prefill = solo.Solo.prefill

    def holding(self):
        prefill(self)
        calls.append(1)
        if len(calls) == 3:  # three chunks in: wait here until the other's admit is queued
            reached.set()
            until_work_waits(engine.mlx)

    monkeypatch.setattr(solo.Solo, "prefill", holding)
    task = asyncio.create_task(run(engine, req))
    assert await asyncio.to_thread(reached.wait, 30)
    other = await run(engine, GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=4)))
    got = await task
    assert seen["unstarted"] == 1 and seen["resume"] == 0 and len(calls) == 3
    assert got[0] == alone[0] and other[3].completion_tokens == 4
    np.testing.assert_allclose(got[1], alone[1], rtol=0, atol=1e-4)
