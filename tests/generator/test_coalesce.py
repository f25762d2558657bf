"""Memory lookups shared by requests that arrive together (services/generator/coalesce.py), and
through the engine: eight LOCAL requests with one memory make one lookup, join the decode batch
together (no left padding) and generate what each generates alone."""

import asyncio
import threading

import pytest

from services.generator import scheduler
from services.generator.coalesce import Coalescer
from services.generator.request_types import GenerationRequest, MemoryOptions, Sampling

from .helpers import run


async def test_callers_of_one_iteration_share_one_call_per_key():
    c = Coalescer()
    calls = []

    def fn(tag):
        calls.append(tag)
        return tag

    out = await asyncio.gather(*(c.run(k, lambda k=k: fn(k)) for k in ["a", "a", "b", "a", "b"]))
    assert out == ["a", "a", "b", "a", "b"]
    assert sorted(calls) == ["a", "b"]


async def test_a_caller_after_the_call_started_makes_its_own():
    """The shared call began before the late caller arrived: it must not answer for it (it could
    predate, say, a deletion the late caller has seen)."""
    c = Coalescer()
    started, release = threading.Event(), threading.Event()
    calls = []

    def slow():
        calls.append(len(calls))
        started.set()
        release.wait(10)
        return len(calls)

    first = asyncio.ensure_future(c.run("k", slow))
    while not started.is_set():
        await asyncio.sleep(0.001)
    late = asyncio.ensure_future(c.run("k", slow))
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.gather(first, late)
    assert calls == [0, 1]


async def test_an_exception_reaches_every_sharing_caller():
    c = Coalescer()

    def boom():
        raise LookupError("no such memory")

    out = await asyncio.gather(*(c.run("k", boom) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(e, LookupError) and str(e) == "no such memory" for e in out)


async def test_a_cancelled_caller_leaves_the_call_to_the_others():
    c = Coalescer()
    release = threading.Event()

    def slow():
        release.wait(10)
        return "answer"

    a = asyncio.ensure_future(c.run("k", slow))
    b = asyncio.ensure_future(c.run("k", slow))
    await asyncio.sleep(0.01)
    a.cancel()
    release.set()
    assert await b == "answer"
    with pytest.raises(asyncio.CancelledError):
        await a


async def test_eight_local_requests_look_up_once_and_join_one_unpadded_batch(engine, memory, monkeypatch):
    mid, tokens = memory
    # Prompts of one length: sequences prefilled together decode unpadded, so a padded batch
    # means that one of them joined late.
    prompts = [tokens[i * 7 : i * 7 + 6] for i in range(8)]
    opts = MemoryOptions((mid,), top_k=4)
    alone = [(await run(engine, GenerationRequest(p, Sampling(max_tokens=6), opts)))[0] for p in prompts]

    lookups, padded = [], []
    resolve = engine.resolver.resolve
    monkeypatch.setattr(engine.resolver, "resolve", lambda *a, **kw: lookups.append(1) or resolve(*a, **kw))
    unpadded = scheduler._unpadded_caches

    def spy(gen):  # a decode batch (not an empty one, before any sequence joined) was padded
        caches = unpadded(gen)
        if gen._generation_batch.uids:
            padded.append(not caches)
        return caches

    monkeypatch.setattr(scheduler, "_unpadded_caches", spy)
    together = await asyncio.gather(*(run(engine, GenerationRequest(p, Sampling(max_tokens=6), opts)) for p in prompts))
    assert [t[0] for t in together] == alone
    assert len(lookups) == 1
    assert padded and not any(padded), padded
