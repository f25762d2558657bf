"""A request whose memories an earlier request resolved is admitted on that resolution while its
own lookup runs (services/generator/memory_lookup.py): nothing reaches its caller before the
lookup returns; the same memories let its events flow, other memories run it again on them, an
error ends it with that error alone. Real memory service, real Redis, real gRPC, tiny model."""

from __future__ import annotations

import asyncio

import prometheus_client
import pytest

from extmind import errors
from services.generator.memory_lookup import LOOKUPS_AHEAD
from services.generator.request_types import Chunk, GenerationRequest, MemoryOptions, Sampling
from services.generator.scheduler_metrics import GENERATED_TOKENS, PROMPT_TOKENS

from .helpers import MlxHold, queued, run, until
from .memory_helpers import held_lookups, recreate_memory

OTHER = "The lighthouse keeper counted ships every night and wrote their names in a red book."


def _outcomes() -> dict[str, float]:
    return {o: LOOKUPS_AHEAD.labels(o)._value.get() for o in ("confirmed", "stale", "failed")}


def _moved(before: dict) -> dict[str, float]:
    return {o: v - before[o] for o, v in _outcomes().items() if v != before[o]}


async def _start_held(engine, req, got: list, answered) -> asyncio.Future:
    """Starts ``req`` (its events into ``got``) inside ``held_lookups`` and waits until its lookup
    answered GetMemory (held before it returns). -> the request's task."""
    task = asyncio.ensure_future(_collect(engine, req, got))
    await until(lambda: bool(answered), "the lookup answered GetMemory")
    return task


async def _idle(engine) -> bool:
    return (await asyncio.to_thread(engine.stats))["active"] == 0


def _generated() -> float:
    return GENERATED_TOKENS._value.get()


async def _made(engine, start: float, n: int) -> bool:
    """Whether ``n`` tokens were generated since the count was ``start`` and the scheduler is idle."""
    return _generated() - start >= n and await _idle(engine)


async def _collect(engine, req, into: list):
    async for ev in engine.generate(req):
        into.append(ev)


def _prompt(engine) -> list[int]:
    return engine.tokenizer.encode("Bob likes")


async def test_a_known_memory_is_generated_before_its_lookup_returns_and_held_until_it_does(engine, fresh, monkeypatch):
    mid = fresh("ahead-known")
    req = GenerationRequest(_prompt(engine), Sampling(max_tokens=4), MemoryOptions((mid,), top_k=2))
    waited = await run(engine, req)  # no resolution known yet: looked up first, then admitted
    before, start = _outcomes(), _generated()
    got: list = []
    with held_lookups(engine, monkeypatch) as (release, _, answered):
        task = await _start_held(engine, req, got, answered)
        # Its 4 tokens are made while the lookup is held (the request ended in the scheduler),
        # and none of them reached the caller.
        await until(lambda: _made(engine, start, 4), "the request generated while its lookup was held")
        assert got == []
        release.set()
        await task
    tokens = [t for ev in got if isinstance(ev, Chunk) for t in ev.token_ids]
    lps = [x for ev in got if isinstance(ev, Chunk) for x in ev.logprobs]
    assert (tokens, lps) == (waited[0], waited[1])
    assert got[-1].completion_tokens == 4
    assert _moved(before) == {"confirmed": 1}


async def test_a_memory_deleted_since_its_last_resolution_is_not_found_and_nothing_else(
    engine, client, fresh, monkeypatch
):
    mid = fresh("ahead-deleted")
    req = GenerationRequest(_prompt(engine), Sampling(max_tokens=4), MemoryOptions((mid,), top_k=2))
    await run(engine, req)
    client.delete_memory(mid)
    before, start = _outcomes(), _generated()
    got: list = []
    with held_lookups(engine, monkeypatch) as (release, _, answered):
        task = await _start_held(engine, req, got, answered)
        await until(lambda: _made(engine, start, 4), "the request ran on the last resolution")
        release.set()
        with pytest.raises(errors.NotFound, match=mid):
            await task
    assert got == []
    assert _moved(before) == {"failed": 1}
    # The failed lookup forgot the resolution: the next request waits for its own lookup.
    with pytest.raises(errors.NotFound):
        await run(engine, req)
    assert _moved(before) == {"failed": 1}


async def test_a_memory_created_again_runs_the_request_again_on_its_new_rows(engine, client, fresh):
    mid = fresh("ahead-recreated")
    req = GenerationRequest(_prompt(engine), Sampling(max_tokens=8), MemoryOptions((mid,), top_k=4))
    old = await run(engine, req)
    client.delete_memory(mid)
    fresh(mid, OTHER)  # the same id, other rows; the old bank and resolution are still cached
    before = _outcomes()
    again = await run(engine, req)
    assert _moved(before) == {"stale": 1}
    waited = await run(engine, req)  # the next request, admitted on the new resolution: confirmed
    assert _moved(before) == {"stale": 1, "confirmed": 1}
    engine.lookups.last.drop(((mid,), False))
    looked_up_first = await run(engine, req)  # no guess: the lookup, then the admission
    assert again[:2] == waited[:2] == looked_up_first[:2]
    assert again[0] != old[0], "the two memories must lead to different tokens, or this test shows nothing"
    assert again[3].completion_tokens == 8


async def test_a_caller_gone_while_the_lookup_runs_frees_its_slot(engine, fresh, monkeypatch):
    mid = fresh("ahead-gone")
    req = GenerationRequest(_prompt(engine), Sampling(max_tokens=200), MemoryOptions((mid,), top_k=2))
    await run(engine, GenerationRequest(_prompt(engine), Sampling(max_tokens=1), req.memory))
    start = _generated()
    with held_lookups(engine, monkeypatch) as (release, _, answered):
        got: list = []
        task = await _start_held(engine, req, got, answered)
        await until(lambda: _generated() > start, "the request began generating")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await until(lambda: _idle(engine), "the cancelled request left the scheduler")
        release.set()
    assert got == []


async def test_citations_are_guessed_with_the_memory_tokens(engine, fresh):
    mid = fresh("ahead-cited")
    plain = MemoryOptions((mid,), top_k=4)
    cited = MemoryOptions((mid,), top_k=4, return_citations=True, citation_min_weight=0.0)
    prompt = _prompt(engine)
    await run(engine, GenerationRequest(prompt, Sampling(max_tokens=6), plain))
    before = _outcomes()
    first = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=6), cited))
    assert _moved(before) == {}, "a resolution without the memory's tokens is no guess for a citing request"
    second = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=6), cited))
    assert _moved(before) == {"confirmed": 1}
    assert first[3].citations and second[:3] == first[:3]
    assert second[3].citations == first[3].citations
    assert (second[3].row_counts == first[3].row_counts).all()


async def test_a_remote_request_waits_for_its_own_lookup(engine, fresh):
    """REMOTE retrieval searches the memory service at every layer, where a stale guess would fail
    a step: REMOTE requests are never admitted ahead of their lookup."""
    mid = fresh("ahead-remote")
    req = GenerationRequest(_prompt(engine), Sampling(max_tokens=3), MemoryOptions((mid,), top_k=2, mode="remote"))
    first = await run(engine, req)
    before = _outcomes()
    assert engine.lookups.guess(req.memory) is None
    assert (await run(engine, req))[:2] == first[:2]
    assert _moved(before) == {}


async def test_a_request_refused_on_a_guess_gets_its_lookups_error_first(engine, client, fresh):
    # Without the lookup ahead the lookup comes first: a deleted memory is NOT_FOUND whether or not
    # the queue is full. On a guess the admission comes first; its refusal must not answer before
    # the lookup has (nothing reaches the caller before its own lookup returns).
    mid = fresh("ahead-refused")
    req = GenerationRequest(_prompt(engine), Sampling(max_tokens=2), MemoryOptions((mid,), top_k=2))
    await run(engine, req)
    client.delete_memory(mid)
    limit, engine._scheduler.max_queue = engine._scheduler.max_queue, 0  # every admission refused
    try:
        with pytest.raises(errors.NotFound, match=mid):
            await run(engine, req)
    finally:
        engine._scheduler.max_queue = limit
    assert await _idle(engine)


async def test_a_bank_evicted_before_an_admission_on_a_guess_of_a_memory_created_again_runs_on_the_new_one(
    engine, client, fresh
):
    # The guess saw the old bank cached; evicted before the admission, the admission fetches the
    # old incarnation on the MLX thread, which is gone (created again): the request must run on
    # the new memory, as its own lookup says, not fail with the stale guess's error.
    mid = fresh("ahead-evicted")
    req = GenerationRequest(_prompt(engine), Sampling(max_tokens=8), MemoryOptions((mid,), top_k=4))
    await run(engine, req)
    client.delete_memory(mid)
    fresh(mid, OTHER)
    before = _outcomes()
    hold = MlxHold(engine)
    await hold.started()
    task = asyncio.ensure_future(run(engine, req))
    await queued(engine, 1)  # its admission, on the guess (the old bank was cached)
    engine.bank_cache.evict(mid)
    hold.release()
    await hold.done()
    again = await task
    assert _moved(before) == {"stale": 1}
    engine.lookups.last.drop(((mid,), False))
    assert again[:2] == (await run(engine, req))[:2]
    assert again[3].completion_tokens == 8


def _observed() -> dict[str, float]:
    """Per-request observations so far: time to first token, and request seconds by finish reason."""
    reg = prometheus_client.REGISTRY
    out = {"ttft": reg.get_sample_value("extmind_generator_time_to_first_token_seconds_count") or 0.0}
    for how in ("stop", "length", "stop_sequence", "error", "cancelled"):
        out[how] = reg.get_sample_value("extmind_generator_request_seconds_count", {"finish_reason": how}) or 0.0
    return out


def _observed_since(before: dict) -> dict[str, float]:
    return {k: v - before[k] for k, v in _observed().items() if v != before[k]}


async def test_a_request_run_again_is_observed_once(engine, client, fresh):
    # The dropped run's first token and end are no request's: the metrics count each request once,
    # as a request that looked up first would be.
    mid = fresh("ahead-observed-stale")
    req = GenerationRequest(_prompt(engine), Sampling(max_tokens=8), MemoryOptions((mid,), top_k=4))
    await run(engine, req)
    client.delete_memory(mid)
    fresh(mid, OTHER)
    before, seen = _outcomes(), _observed()
    again = await run(engine, req)
    assert _moved(before) == {"stale": 1}
    assert again[3].completion_tokens == 8
    assert _observed_since(seen) == {"ttft": 1, "length": 1}


async def test_a_request_whose_lookup_failed_is_not_observed_as_generated(engine, client, fresh, monkeypatch):
    # It ran to its end while its lookup was held, then ended with NOT_FOUND: no first token, no
    # "length" end reached its caller (a request whose lookup failed before admission is not
    # observed at all).
    mid = fresh("ahead-observed-failed")
    req = GenerationRequest(_prompt(engine), Sampling(max_tokens=4), MemoryOptions((mid,), top_k=2))
    await run(engine, req)
    client.delete_memory(mid)
    seen, start = _observed(), _generated()
    with held_lookups(engine, monkeypatch) as (release, _, answered):
        task = asyncio.ensure_future(run(engine, req))
        await until(lambda: bool(answered), "the lookup answered GetMemory")
        await until(lambda: _made(engine, start, 4), "the request ran on the last resolution")
        release.set()
        with pytest.raises(errors.NotFound):
            await task
    assert _observed_since(seen) == {}


async def test_a_request_confirmed_is_observed_once(engine, fresh):
    mid = fresh("ahead-observed-confirmed")
    req = GenerationRequest(_prompt(engine), Sampling(max_tokens=4), MemoryOptions((mid,), top_k=2))
    await run(engine, req)
    before, seen = _outcomes(), _observed()
    await run(engine, req)
    assert _moved(before) == {"confirmed": 1}
    assert _observed_since(seen) == {"ttft": 1, "length": 1}


def _forget(engine, m: MemoryOptions) -> None:
    engine.lookups.last.drop(((*m.memory_ids,), m.return_citations))


async def test_requests_held_together_on_a_memory_created_again_all_run_again(engine, client, fresh, monkeypatch):
    mid = fresh("ahead-several")
    m = MemoryOptions((mid,), top_k=4)
    reqs = [GenerationRequest(_prompt(engine), Sampling(max_tokens=n), m) for n in (3, 6, 9)]
    await run(engine, reqs[0])
    client.delete_memory(mid)
    fresh(mid, OTHER)
    before = _outcomes()
    with held_lookups(engine, monkeypatch) as (release, _, answered):
        tasks = [asyncio.ensure_future(run(engine, r)) for r in reqs]
        await until(lambda: bool(answered), "the shared lookup answered GetMemory")
        release.set()
        again = await asyncio.gather(*tasks)
    assert _moved(before) == {"stale": 3}
    _forget(engine, m)
    for r, got in zip(reqs, again, strict=True):
        assert got[:2] == (await run(engine, r))[:2]
    assert await _idle(engine)


async def _run_again_and_first(engine, client, fresh, req) -> tuple:
    """``req`` run on its memory, the memory created again with OTHER's text under the same id,
    ``req`` run again (its guess stale: one "stale" outcome), the resolution forgotten, and ``req``
    run once more, looked up first. -> (the run again, the run looked up first)."""
    mid = req.memory.memory_ids[0]
    await run(engine, req)
    client.delete_memory(mid)
    fresh(mid, OTHER)
    before = _outcomes()
    again = await run(engine, req)
    assert _moved(before) == {"stale": 1}
    _forget(engine, req.memory)
    return again, await run(engine, req)


async def test_a_seeded_request_run_again_draws_as_one_that_looked_up_first(engine, client, fresh):
    mid = fresh("ahead-seeded")
    m = MemoryOptions((mid,), top_k=4)
    req = GenerationRequest(_prompt(engine), Sampling(max_tokens=12, temperature=1.5, seed=7), m)
    again, first = await _run_again_and_first(engine, client, fresh, req)
    assert again[:2] == first[:2]


async def test_citations_of_a_request_run_again_are_the_new_memorys(engine, client, fresh):
    mid = fresh("ahead-cited-again")
    m = MemoryOptions((mid,), top_k=4, return_citations=True, citation_min_weight=0.0)
    req = GenerationRequest(_prompt(engine), Sampling(max_tokens=6), m)
    again, first = await _run_again_and_first(engine, client, fresh, req)
    assert again[:3] == first[:3]
    assert again[3].citations == first[3].citations and first[3].citations
    assert (again[3].row_counts == first[3].row_counts).all()


async def test_a_caller_gone_during_the_run_again_frees_its_slot(engine, client, fresh, monkeypatch):
    mid = fresh("ahead-gone-again")
    req = GenerationRequest(_prompt(engine), Sampling(max_tokens=400), MemoryOptions((mid,), top_k=2))
    await run(engine, GenerationRequest(_prompt(engine), Sampling(max_tokens=1), req.memory))
    client.delete_memory(mid)
    fresh(mid, OTHER)
    before = _outcomes()
    got: list = []
    with held_lookups(engine, monkeypatch) as (release, _, answered):
        task = await _start_held(engine, req, got, answered)
        release.set()
        await until(lambda: _moved(before) == {"stale": 1}, "the lookup found other memories")
    await until(lambda: bool(got), "the run again streamed its first tokens")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await until(lambda: _idle(engine), "the cancelled request left the scheduler")


async def test_a_memory_created_again_by_another_model_is_that_error_alone(engine, client, fresh):
    # Deleted and created again under its id by another model (same layout, same rows): the guess
    # runs on the old bank, the lookup refuses the new memory; the caller gets that refusal only.
    mid = fresh("ahead-other-model")
    req = GenerationRequest(_prompt(engine), Sampling(max_tokens=4), MemoryOptions((mid,), top_k=2))
    await run(engine, req)
    recreate_memory(client, mid, mid, fingerprint="sha256:" + "0" * 64)
    before, prompts = _outcomes(), PROMPT_TOKENS._value.get()
    got: list = []
    with pytest.raises(errors.FailedPrecondition, match="another model"):
        await _collect(engine, req, got)
    assert got == []
    assert _moved(before) == {"failed": 1}
    assert PROMPT_TOKENS._value.get() > prompts, "it ran on the guess, or this test shows nothing"
    assert await _idle(engine)


async def test_requests_held_together_on_a_deleted_memory_all_get_not_found_alone(engine, client, fresh, monkeypatch):
    mid = fresh("ahead-several-deleted")
    m = MemoryOptions((mid,), top_k=4)
    reqs = [GenerationRequest(_prompt(engine), Sampling(max_tokens=n), m) for n in (3, 6, 9)]
    await run(engine, reqs[0])
    client.delete_memory(mid)
    before = _outcomes()
    got: list = [[], [], []]
    with held_lookups(engine, monkeypatch) as (release, _, answered):
        tasks = [asyncio.ensure_future(_collect(engine, r, g)) for r, g in zip(reqs, got, strict=True)]
        await until(lambda: bool(answered), "the shared lookup answered GetMemory")
        release.set()
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, errors.NotFound) for o in outcomes), outcomes
    assert got == [[], [], []]
    assert _moved(before) == {"failed": 3}
    await until(lambda: _idle(engine), "the guessed runs left the scheduler")


def test_every_outcome_is_exported_from_the_start():
    text = prometheus_client.generate_latest().decode()
    for outcome in ("confirmed", "stale", "failed"):
        assert f'extmind_generator_memory_lookups_ahead_total{{outcome="{outcome}"}}' in text
