"""Streamed tokens are handed to the callers' event loops at most once per stream interval
(``--stream-interval-ms``), the tokens of the steps in between joined into one Chunk; the first
token, the end and errors leave at once, and nothing waits while the MLX thread does other work."""

from __future__ import annotations

import asyncio
import time

import pytest

from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.request_types import Chunk, Final, GenerationRequest, Sampling
from services.generator.running_request import RunningRequest

PROMPT = "The quick brown fox jumps over the lazy dog. Paris is"


@pytest.fixture(scope="module")
def engines(llama_path):
    made = {}
    for interval in (0.0, 60_000.0):  # every step; never by time (only urgent events and flushes)
        e = GeneratorEngine(EngineConfig(model=str(llama_path), stream_interval_ms=interval))
        e.start()
        made[interval] = e
    yield made
    for e in made.values():
        e.stop()


def test_joined_chunks_keep_every_token_in_order():
    a = Chunk("a", [1], [-0.5], [[(1, -0.5)]])
    b = Chunk("", [2], [-1.0], [[(2, -1.0), (1, -2.0)]])
    c = Chunk("bc", [3], [-0.25], [[(3, -0.25)]])
    assert Chunk.joined([a]) is a
    assert Chunk.joined([a, b, c]) == Chunk(
        "abc", [1, 2, 3], [-0.5, -1.0, -0.25], [*a.top_logprobs, *b.top_logprobs, *c.top_logprobs]
    )


async def _events(engine, req) -> tuple[list[Chunk], Final]:
    chunks, final = [], None
    async for ev in engine.generate(req):
        if isinstance(ev, Chunk):
            chunks.append(ev)
        else:
            final = ev
    return chunks, final


async def test_a_long_interval_wakes_the_loop_for_urgent_events_only_and_loses_nothing(engines, monkeypatch):
    quick, slow = engines[0.0], engines[60_000.0]
    req = GenerationRequest(quick.tokenizer.encode(PROMPT), Sampling(max_tokens=40), None, True, 2)
    want, want_final = await _events(quick, req)
    loop = asyncio.get_running_loop()
    wakes = []
    plain = loop.call_soon_threadsafe
    monkeypatch.setattr(loop, "call_soon_threadsafe", lambda *a, **k: wakes.append(a) or plain(*a, **k))
    chunks, final = await _events(slow, req)
    # The first token alone and at once, the rest joined: the same tokens, logprobs, top
    # logprobs and text as handed over step by step.
    assert len(chunks[0].token_ids) == 1 and len(chunks) <= 4
    assert Chunk.joined(chunks) == Chunk.joined(want) and len(Chunk.joined(want).token_ids) == 40
    assert len(Chunk.joined(want).top_logprobs) == 40
    assert final == want_final and final.completion_tokens == 40
    # admit, first token, Final, and a flush each time the scheduler's run of 32 steps ends
    assert len(wakes) <= 5, len(wakes)


async def test_tokens_held_for_the_interval_leave_when_the_mlx_thread_turns_to_other_work(engines):
    slow = engines[60_000.0]
    req = GenerationRequest(slow.tokenizer.encode(PROMPT), Sampling(max_tokens=400))
    stream = slow.generate(req)
    first = await anext(stream)
    assert isinstance(first, Chunk) and len(first.token_ids) == 1
    busy = asyncio.ensure_future(slow.mlx.run(time.sleep, 1.5))  # other work on the MLX thread
    nxt = await asyncio.wait_for(anext(stream), timeout=60)
    assert isinstance(nxt, Chunk) and nxt.token_ids and not busy.done()  # flushed before the work ran
    await busy
    await stream.aclose()


async def test_a_joined_chunk_keeps_tokens_whose_text_is_held_back_apart():
    """A Chunk without text carries tokens whose text a stop string may still cut off; joined
    after text, they would be shown with it (openai_responses.Answer shows a Chunk's tokens with
    its text). So they stay a Chunk of their own, and runs with text in them are joined."""
    r = RunningRequest(GenerationRequest([1]), asyncio.get_running_loop(), None, 8)
    posted = [Chunk("", [1], [-1.0]), Chunk(" is", [2], [-2.0]), Chunk("", [3], [-3.0]), Chunk("", [4], [-4.0])]
    for c in posted:
        r.post(c)
    r.post(Final("stop_sequence", 1, 4))
    r._deliver()
    got = [r.events.get_nowait() for _ in range(r.events.qsize())]
    assert got == [Chunk(" is", [1, 2], [-1.0, -2.0]), Chunk("", [3, 4], [-3.0, -4.0]), Final("stop_sequence", 1, 4)]
