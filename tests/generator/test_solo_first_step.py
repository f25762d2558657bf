"""A request started solo from its prompt at the edges of its first step: one token allowed, a
stop string in its first token, a long prompt prefilled in several chunks, and a first step that
raises (only its own group fails; the engine keeps serving)."""

from __future__ import annotations

import pytest

from extmind import errors
from services.generator import scheduler as sched
from services.generator.request_types import GenerationRequest, Sampling

from .helpers import first_steps_queued
from .test_decode_mask import sliding_llama  # noqa: F401 - the fixture
from .test_solo_decode import ALONG, run, same_steps
from .test_solo_from_prompt import seen, together  # noqa: F401 - the fixture

PROMPT = "Alice met Bob at the"


async def test_one_token_and_a_first_token_stop_string_alone_as_batched(plain_engine, seen):  # noqa: F811
    engine = plain_engine
    prompt = engine.tokenizer.encode(PROMPT)
    one = GenerationRequest(prompt, Sampling(max_tokens=1), return_logprobs=True, top_logprobs=3)
    alone = await run(engine, one)
    assert seen["fresh"] == 1 and alone[3].finish_reason == "length" and alone[3].completion_tokens == 1
    batched, _ = await together(engine, one, GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=8)))
    same_steps(alone, batched)
    first = (await run(engine, GenerationRequest(prompt, Sampling(max_tokens=8))))[2]
    stop = first.strip()[:2]
    assert stop, "the first tokens have no text to stop at"
    req = GenerationRequest(prompt, Sampling(max_tokens=8, stop=(stop,)), return_logprobs=True, top_logprobs=3)
    alone = await run(engine, req)
    assert alone[3].finish_reason == "stop_sequence" and stop not in alone[2]
    batched, _ = await together(engine, req, GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=8)))
    same_steps(alone, batched)
    assert engine.stats()["active"] == 0


@pytest.mark.parametrize("name", ["greedy", "repetition_penalty"])
async def test_a_prompt_longer_than_a_prefill_step_alone_as_batched(plain_engine, seen, monkeypatch, name):  # noqa: F811
    engine = plain_engine
    step = 64  # the prompt is prefilled in three chunks, the last one short
    monkeypatch.setattr(engine._scheduler, "prefill_step_size", step)
    long = engine.tokenizer.encode(" ".join([ALONG] * 40))[: step * 2 + 37]
    assert len(long) == step * 2 + 37
    s = Sampling(max_tokens=10, repetition_penalty=1.5 if name != "greedy" else 1.0)
    req = GenerationRequest(long, s, return_logprobs=True)
    alone = await run(engine, req)
    assert seen["fresh"] == 1
    batched, _ = await together(engine, req, GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=12)))
    assert seen["unstarted"] == 1
    assert alone[0] == batched[0]
    assert alone[3].completion_tokens == batched[3].completion_tokens


async def test_a_first_step_that_raises_fails_only_its_request(plain_engine, seen, monkeypatch):  # noqa: F811
    engine = plain_engine
    real = sched.logits_processors_for

    def boom(tokens, logits):
        raise RuntimeError("processor broke")

    def processors(s):
        return [boom] if s.repetition_penalty == 1.25 else real(s)

    monkeypatch.setattr(sched, "logits_processors_for", processors)
    bad = GenerationRequest(engine.tokenizer.encode(PROMPT), Sampling(max_tokens=5, repetition_penalty=1.25))
    with pytest.raises(errors.Internal, match="processor broke"):
        await run(engine, bad)
    assert seen["fresh"] == 1 and engine.stats()["active"] == 0
    assert sched.WAITING._value.get() == 0 and sched.RUNNING._value.get() == 0
    got = await run(engine, GenerationRequest(engine.tokenizer.encode(PROMPT), Sampling(max_tokens=5)))
    assert got[3].completion_tokens == 5 and seen["fresh"] == 2


async def test_a_solo_cancelled_before_its_first_step_leaves_nothing(plain_engine, seen, monkeypatch):  # noqa: F811
    """Cancelled while its first step is put off (the cancel waits on the MLX thread): it never
    steps, the group goes, the gauges come back to 0 and the next request starts solo again."""
    import asyncio

    from services.generator import solo

    engine = plain_engine
    steps = []
    step = solo.Solo.step
    monkeypatch.setattr(solo.Solo, "step", lambda self: steps.append(self.request.req) or step(self))

    req = GenerationRequest(engine.tokenizer.encode(PROMPT), Sampling(max_tokens=50))
    gen = engine.generate(req)
    first, hold = await first_steps_queued(engine, lambda: asyncio.create_task(anext(gen)))
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await gen.aclose()  # its cancel, queued behind the steps
    hold.release()
    await hold.done()
    for _ in range(500):
        if (engine.stats()["active"], engine.stats()["groups"]) == (0, 0):
            break
        await asyncio.sleep(0.01)
    assert (engine.stats()["active"], engine.stats()["groups"]) == (0, 0)
    assert seen["fresh"] == 1 and req not in steps
    assert sched.WAITING._value.get() == 0 and sched.RUNNING._value.get() == 0
    got = await run(engine, GenerationRequest(engine.tokenizer.encode(PROMPT), Sampling(max_tokens=5)))
    assert got[3].completion_tokens == 5 and seen["fresh"] == 2


async def test_a_model_with_rotating_caches_never_goes_solo(sliding_llama, seen):  # noqa: F811
    """Solo decode hands plain KVCaches over (and trims them): a model with sliding-window layers
    (RotatingKVCache) keeps every request in its BatchGenerator, alone or not, and still serves."""
    from services.generator.engine import EngineConfig, GeneratorEngine

    engine = GeneratorEngine(EngineConfig(model=str(sliding_llama)))
    engine.start()
    try:
        assert engine._scheduler._solo_ok is False
        req = GenerationRequest(list(range(5, 45)), Sampling(max_tokens=20), return_logprobs=True)
        alone = await run(engine, req)
        both, _ = await together(engine, req, GenerationRequest(list(range(7, 16)), Sampling(max_tokens=30)))
        assert len(alone[0]) > 0 and alone[0] == both[0]
        assert seen == {"fresh": 0, "solo": 0, "resume": 0, "unstarted": 0}
    finally:
        engine.stop()


async def test_a_prompt_at_the_context_limit_alone_as_batched(plain_engine, seen):  # noqa: F811
    """A prompt one token short of the context: one token left, made solo from the prompt (its
    prefill in two chunks) as in a batch."""
    engine = plain_engine
    prompt = (engine.tokenizer.encode(" ".join([ALONG] * 600)) * 2)[: engine.max_context - 1]
    assert len(prompt) == engine.max_context - 1 > engine.config.prefill_step_size
    req = GenerationRequest(prompt, Sampling(max_tokens=50), return_logprobs=True, top_logprobs=2)
    alone = await run(engine, req)
    assert seen["fresh"] == 1 and alone[3].finish_reason == "length" and alone[3].completion_tokens == 1
    batched, _ = await together(engine, req, GenerationRequest(engine.tokenizer.encode(ALONG), Sampling(max_tokens=4)))
    assert seen["unstarted"] == 1
    same_steps(alone, batched)
    with pytest.raises(errors.InvalidArgument):
        await run(engine, GenerationRequest(prompt + prompt[:1], Sampling(max_tokens=5)))
    assert engine.stats()["active"] == 0


async def test_stopping_the_engine_while_a_solo_waits_for_its_first_step(llama_path, seen, monkeypatch):  # noqa: F811
    """The engine stops while a request started solo has put its first step off: the request
    ends UNAVAILABLE without stepping, and the stop completes (the unstarted generator closes)."""
    import asyncio

    from services.generator import solo
    from services.generator.engine import EngineConfig, GeneratorEngine

    engine = GeneratorEngine(EngineConfig(model=str(llama_path)))
    engine.start()
    steps = []
    step = solo.Solo.step
    monkeypatch.setattr(solo.Solo, "step", lambda self: steps.append(self.request.req) or step(self))

    req = GenerationRequest(engine.tokenizer.encode(PROMPT), Sampling(max_tokens=50))
    task, hold = await first_steps_queued(engine, lambda: asyncio.create_task(run(engine, req)))
    engine.mlx.submit(lambda: None)  # work behind the steps: the first step is put off
    stopping = asyncio.create_task(asyncio.to_thread(engine.stop))
    for _ in range(3000):  # stop() has begun (it waits for the scheduler thread)
        if engine._scheduler is None or engine._scheduler._stopping:
            break
        await asyncio.sleep(0.001)
    hold.release()
    await asyncio.wait_for(stopping, 30)
    await hold.done()
    with pytest.raises(errors.Unavailable):
        await asyncio.wait_for(task, 10)
    assert seen["fresh"] == 1 and req not in steps
