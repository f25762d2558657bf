"""Memory lookups shared by requests that arrive together (services/generator/coalesce.py), and
through the engine: eight LOCAL requests with one memory make one lookup, join the decode batch
together (no left padding) and generate what each generates alone."""

import asyncio
import threading

import pytest

from extmind import errors
from services.generator import scheduler
from services.generator.coalesce import Coalescer
from services.generator.request_types import GenerationRequest, MemoryOptions, Sampling

from .helpers import run, until
from .memory_helpers import held_lookups


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
    unpadded = scheduler.unpadded_caches

    def spy(gen):  # a decode batch (not an empty one, before any sequence joined) was padded
        caches = unpadded(gen)
        if gen._generation_batch.uids:
            padded.append(not caches)
        return caches

    monkeypatch.setattr(scheduler, "unpadded_caches", spy)
    together = await asyncio.gather(*(run(engine, GenerationRequest(p, Sampling(max_tokens=6), opts)) for p in prompts))
    assert [t[0] for t in together] == alone
    assert len(lookups) == 1
    assert padded and not any(padded), padded


async def test_a_request_after_a_delete_does_not_share_the_lookup_that_read_before_it(engine, client, monkeypatch):
    """Through the engine and the memory service: a lookup that read the memory before it was
    deleted answers for its own request only; one arriving after the delete is NOT_FOUND."""
    mid = engine.memorize_blocking(engine.tokenizer.encode("Bob likes trains."), memory_id="coalesce-del")["memory_id"]
    opts = MemoryOptions((mid,), top_k=2)
    prompt = engine.tokenizer.encode("Bob likes")
    await run(engine, GenerationRequest(prompt, Sampling(max_tokens=2), opts))  # cached
    with held_lookups(engine, monkeypatch, first_only=True) as (_, begun, looked):
        first = asyncio.ensure_future(run(engine, GenerationRequest(prompt, Sampling(max_tokens=2), opts)))
        await until(lambda: bool(looked), "the first lookup read the memory")
        await asyncio.to_thread(client.delete_memory, mid)
        late = asyncio.ensure_future(run(engine, GenerationRequest(prompt, Sampling(max_tokens=2), opts)))
        await until(lambda: len(begun) == 2, "the late request began its own lookup while the first is held")
    assert (await first)[3].completion_tokens == 2  # resolved before the delete: served from the cache
    with pytest.raises(errors.NotFound):
        await late


async def test_a_request_after_a_create_does_not_share_the_lookup_that_read_before_it(engine, client, monkeypatch):
    """The same for a memory created while a lookup that did not find it still runs."""
    mid = "coalesce-create"
    opts = MemoryOptions((mid,), top_k=2)
    prompt = engine.tokenizer.encode("Bob likes")
    with held_lookups(engine, monkeypatch, first_only=True) as (_, begun, looked):
        first = asyncio.ensure_future(run(engine, GenerationRequest(prompt, Sampling(max_tokens=2), opts)))
        await until(lambda: bool(looked), "the first lookup read the memory")
        await asyncio.to_thread(engine.memorize_blocking, engine.tokenizer.encode("Bob likes trains."), memory_id=mid)
        late = asyncio.ensure_future(run(engine, GenerationRequest(prompt, Sampling(max_tokens=2), opts)))
        await until(lambda: len(begun) == 2, "the late request began its own lookup while the first is held")
    with pytest.raises(errors.NotFound):
        await first
    assert (await late)[3].completion_tokens == 2
    client.delete_memory(mid)
