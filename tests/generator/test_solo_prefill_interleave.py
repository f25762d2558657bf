"""A long prompt started solo from its prompt is prefilled one ``prefill_step_size`` chunk per
scheduler pass, as a BatchGenerator prefills it: the other groups keep decoding between its
chunks (and work queued on the MLX thread runs between them) rather than waiting for the whole
prompt in one step."""

from __future__ import annotations

import asyncio

from services.generator import scheduler as sched
from services.generator.request_types import Chunk, GenerationRequest, MemoryOptions, Sampling

from .test_solo_decode import ALONG, run
from .test_solo_from_prompt import seen  # noqa: F401 - the fixture


async def test_other_groups_decode_between_the_chunks_of_a_solo_prefill(engine, memory, seen, monkeypatch):  # noqa: F811
    step = 16
    monkeypatch.setattr(engine._scheduler, "prefill_step_size", step)
    mid, _ = memory
    tokens_of, marks = {}, {}
    on_token = sched.Scheduler._on_token

    def counting(self, r, resp):
        tokens_of[id(r.req)] = tokens_of.get(id(r.req), 0) + 1
        on_token(self, r, resp)

    admit = sched.Scheduler.admit

    def admitting(self, r, *a, **kw):
        admit(self, r, *a, **kw)
        marks["admitted"] = dict(tokens_of)

    monkeypatch.setattr(sched.Scheduler, "_on_token", counting)
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

    monkeypatch.setattr(sched.Scheduler, "_on_token", first)
    req = GenerationRequest(long, Sampling(max_tokens=3))
    got = await run(engine, req)
    await stream.aclose()
    assert got[3].completion_tokens == 3 and seen["fresh"] == 1
    between = first_at["first"][id(other)] - marks["admitted"][id(other)]
    assert between >= chunks - 2, f"the other group made {between} tokens during a {chunks}-chunk prefill"
    for _ in range(200):
        if engine.stats()["active"] == 0:
            break
        await asyncio.sleep(0.01)
