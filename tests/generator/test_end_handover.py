"""The end of a request with memories (InFlight.finish_ends, in_flight.py): its last token is handed over before
its end reads the device (citation counts, attention mass). Whatever way it ends (length, EOS,
stop string, a failed count, its caller gone), alone or with others of a batch, with tokens held
for the stream interval or not, its caller gets every token once, in order, then one Final or
one error, with the metrics of its end settled; the engine is idle afterwards."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY

from extmind import errors
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.request_types import Chunk, Final, GenerationRequest, MemoryOptions, Sampling

from .helpers import MlxHold, on_two_loops, queued, until
from .memory_helpers import TEXT

PROMPT = "Alice met Bob at"
RUNNING, WAITING = "extmind_generator_running_requests", "extmind_generator_waiting_requests"
GENERATED = "extmind_generator_generated_tokens_total"


def sample(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture(scope="module")
def engines(llama_path, memory_address):
    made = {}
    for interval in (0.0, 60_000.0):  # every step; only urgent events and flushes
        e = GeneratorEngine(
            EngineConfig(
                model=str(llama_path), memory_url=memory_address, window=3072, stride=512, stream_interval_ms=interval
            )
        )
        e.start()
        made[interval] = e
    yield made
    for e in made.values():
        e.stop()


@pytest.fixture(scope="module")
def mid(engines):
    e = engines[0.0]
    return e.memorize_blocking(e.tokenizer.encode(TEXT), labels={"kind": "end-handover"})["memory_id"]


async def stream(engine, req, *, close_after: int | None = None) -> list:
    """Every event the caller gets, in order (an error as its last item). close_after: the
    caller goes (closes the stream) once it has that many tokens."""
    out, n = [], 0
    gen = engine.generate(req)
    try:
        async for ev in gen:
            out.append(ev)
            n += len(getattr(ev, "token_ids", ()))
            if close_after is not None and n >= close_after:
                break
    except errors.ExtmindError as e:
        out.append(e)
    finally:
        await gen.aclose()
    return out


def tokens_of(evs) -> list[int]:
    return [t for ev in evs if isinstance(ev, Chunk) for t in ev.token_ids]


def assert_well_formed(evs) -> None:
    """Chunks (the first with one token), then exactly one Final or one error, nothing else."""
    assert evs and all(isinstance(ev, Chunk) for ev in evs[:-1]), evs
    assert isinstance(evs[-1], (Final, errors.ExtmindError)), evs
    chunks = [ev for ev in evs if isinstance(ev, Chunk)]
    assert not chunks or len(chunks[0].token_ids) == 1, chunks[0]
    assert all(ev.token_ids for ev in chunks), evs


def final_fields(f: Final) -> tuple:
    return f.finish_reason, f.prompt_tokens, f.completion_tokens, f.citations, f.remaining_text


async def idle(engine) -> None:
    async def done():  # stats() waits for the MLX thread: not on the loop, which a hand-over may wait for
        s = await asyncio.to_thread(engine.stats)
        return s["active"] == 0 and s["groups"] == 0

    await until(done, "the engine is idle")


def opts(mid, cite: bool, mode: str) -> MemoryOptions:
    return MemoryOptions((mid,), top_k=4, mode=mode, return_citations=cite, max_citations=1000)


@pytest.mark.parametrize("mode", ["local", "remote"])
@pytest.mark.parametrize("cite", [False, True])
@pytest.mark.parametrize("end", ["length1", "length", "eos1", "eos", "stop"])
async def test_every_end_of_a_lone_request_gives_every_token_once_then_one_final(
    engines, mid, monkeypatch, end, cite, mode
):
    quick, slow = engines[0.0], engines[60_000.0]
    prompt = quick.tokenizer.encode(PROMPT)
    o = opts(mid, cite, mode)
    full = tokens_of(await stream(quick, GenerationRequest(prompt, Sampling(max_tokens=12), o)))
    assert len(full) == 12
    sampling, want = Sampling(max_tokens=8), full[:8]
    if end == "length1":
        sampling, want = Sampling(max_tokens=1), full[:1]
    elif end in ("eos", "eos1"):
        at = 0 if end == "eos1" else next(i for i in range(3, 12) if full[i] not in full[:i])
        want = full[:at]
        for e in (quick, slow):  # the token at ``at`` ends the sequence (EOS): no Chunk for it
            s = e._scheduler
            monkeypatch.setattr(s, "eos_ids", [*s.eos_ids, full[at]])
            monkeypatch.setattr(s, "_eos", frozenset(s._eos | {full[at]}))
        sampling = Sampling(max_tokens=12)
    elif end == "stop":
        text = quick.tokenizer.decode(full)
        stop = text[len(quick.tokenizer.decode(full[:4])) :][:3]
        assert stop.strip(), text
        sampling = Sampling(max_tokens=12, stop=(stop,))
        want = None
    req = GenerationRequest(prompt, sampling, o)
    got = {}
    for interval, e in ((0.0, quick), (60_000.0, slow)):
        evs = await stream(e, req)
        assert_well_formed(evs)
        assert isinstance(evs[-1], Final), evs[-1]
        got[interval] = evs
        await idle(e)
    a, b = got[0.0], got[60_000.0]
    assert tokens_of(a) == tokens_of(b) and final_fields(a[-1]) == final_fields(b[-1])
    if want is not None:
        assert tokens_of(a) == want
    reason = {"length1": "length", "length": "length", "eos1": "stop", "eos": "stop", "stop": "stop_sequence"}[end]
    assert a[-1].finish_reason == reason
    assert cite or not a[-1].citations
    # held for the interval: the first token alone, the rest joined (tokens whose text is held
    # back for a stop string a Chunk of their own)
    assert len([ev for ev in b if isinstance(ev, Chunk)]) <= 3


async def _together(engine, reqs, on_final=None):
    """Runs ``reqs`` admitted together (the MLX thread held until every admit waits), each caller
    calling ``on_final(i)`` as it gets its Final. -> each caller's events."""
    for _ in range(500):
        if (await asyncio.to_thread(engine.stats))["groups"] == 0 and not engine.mlx.has_waiting():
            break
        await asyncio.sleep(0.02)
    out = {}

    async def one(i, req):
        evs = []
        try:
            async for ev in engine.generate(req):
                evs.append(ev)
                if isinstance(ev, Final) and on_final is not None:
                    on_final(i)
        except errors.ExtmindError as e:
            evs.append(e)
        out[i] = evs

    hold = MlxHold(engine, seconds=60)
    await hold.started()
    try:
        tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(reqs)]
        await queued(engine, len(reqs), seconds=30)  # each request's next MLX call, after resolving, is its admit
    finally:
        hold.release()
    await asyncio.gather(*tasks)
    return [out[i] for i in range(len(reqs))]


@pytest.mark.parametrize("mode", ["local", "remote"])
@pytest.mark.parametrize("interval", [0.0, 60_000.0])
@pytest.mark.parametrize("max_tokens", [1, 3])
async def test_requests_ending_in_one_step_get_their_final_with_the_metrics_settled(
    engines, mid, monkeypatch, interval, max_tokens, mode
):
    """Citing requests of one batch end in the same step. The one whose end comes first in the step
    must not get its Final before the step's gauges and token count moved (the scheduler hands
    Finals over after them: a caller that got its Final reads them settled)."""
    from services.generator import running_request

    engine = engines[interval]
    monkeypatch.setattr(running_request.Handover, "URGENT_WAIT", 30.0)  # the callers surely ran
    prompts = ["Water boils at", "Alice met Bob at", "The capital of", "Rome is the"]
    reqs = [
        GenerationRequest(engine.tokenizer.encode(p), Sampling(max_tokens=max_tokens), opts(mid, True, mode))
        for p in prompts
    ]
    start = sample(GENERATED)
    seen = {}

    def on_final(i):
        seen[i] = (sample(RUNNING), sample(WAITING), sample(GENERATED) - start)

    results = await _together(engine, reqs, on_final)
    for evs in results:
        assert_well_formed(evs)
        assert isinstance(evs[-1], Final) and len(tokens_of(evs)) == max_tokens and evs[-1].citations
    total = len(reqs) * max_tokens
    assert seen == {i: (0, 0, total) for i in range(len(reqs))}, seen
    await idle(engine)


@pytest.mark.parametrize("interval", [0.0, 60_000.0])
async def test_a_request_ending_in_the_pass_of_another_groups_end_gets_its_final_with_the_gauges_settled(
    engines, mid, monkeypatch, interval
):
    """A request without memories (its own group, stepped first) and a citing one (another group)
    end in the same pass of the scheduler: the citing one's end hands the tokens over before its
    reads, which must not carry the first one's Final to its caller before the gauges moved."""
    from services.generator import running_request

    engine = engines[interval]
    s = engine._scheduler
    monkeypatch.setattr(running_request.Handover, "URGENT_WAIT", 30.0)  # the callers surely ran
    plain = GenerationRequest(engine.tokenizer.encode("Water boils at"), Sampling(max_tokens=10_000))
    citing = GenerationRequest(engine.tokenizer.encode(PROMPT), Sampling(max_tokens=10_000), opts(mid, True, "local"))
    seen, ends, passes = {}, [], [0]
    finish, step_all = s._flight._finish, s._step_all

    def counting():
        passes[0] += 1
        step_all()

    def spy(r, reason):
        ends.append((r.req is plain, passes[0]))
        finish(r, reason)

    monkeypatch.setattr(s._flight, "_finish", spy)
    monkeypatch.setattr(s, "_step_all", counting)
    out = {}

    async def one(i, req, started):
        evs = []
        async for ev in engine.generate(req):
            evs.append(ev)
            started.set()
            if isinstance(ev, Final):
                seen[i] = (sample(RUNNING), sample(WAITING))
        out[i] = evs

    started = [asyncio.Event(), asyncio.Event()]
    tasks = [asyncio.create_task(one(0, plain, started[0]))]
    await asyncio.wait_for(started[0].wait(), 30)  # decoding: its group steps first in every pass
    tasks.append(asyncio.create_task(one(1, citing, started[1])))
    await asyncio.wait_for(started[1].wait(), 30)
    # Between two passes: every token is EOS from now on (both decode solo: the scheduler's EOS set)
    await engine.mlx.run(monkeypatch.setattr, s, "_eos", frozenset(range(engine.vocab_size)))
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    for i in (0, 1):
        assert_well_formed(out[i])
        assert out[i][-1].finish_reason == "stop"
    assert [e[0] for e in ends] == [True, False] and ends[0][1] == ends[1][1], ends
    # the plain request's Final leaves with the citing one's tokens, before that one's end: the
    # gauges then count the citing one (running) and no longer the plain one
    assert seen[0] in ((0, 0), (1, 0)) and seen[1] == (0, 0), seen
    await idle(engine)


async def test_requests_ending_in_one_step_wake_their_loop_twice_at_most(engines, mid, monkeypatch):
    """One-token citing requests of one batch, one caller loop: their tokens leave before the end
    reads (one urgent wake-up) and their Finals after (another), not one urgent wake-up per
    request, each of which makes the MLX thread wait for the loop (Handover.URGENT_WAIT)."""
    from services.generator import running_request

    engine = engines[60_000.0]
    waits = []
    plain = running_request.wake_loops
    monkeypatch.setattr(running_request, "wake_loops", lambda rs, wait=0.0: waits.append(wait) or plain(rs, wait))
    prompts = ["Water boils at", "Alice met Bob at", "The capital of", "Rome is the", "Paris is", "Berlin"]
    reqs = [
        GenerationRequest(engine.tokenizer.encode(p), Sampling(max_tokens=1), opts(mid, True, "local")) for p in prompts
    ]
    results = await _together(engine, reqs)
    for evs in results:
        assert_well_formed(evs)
        assert [type(ev) for ev in evs] == [Chunk, Final] and evs[-1].citations
    assert sum(w > 0 for w in waits) <= 2, waits
    await idle(engine)


@pytest.mark.parametrize("interval", [0.0, 60_000.0])
@pytest.mark.parametrize("max_tokens", [1, 4])
async def test_a_caller_gone_at_its_last_token_is_observed_once(engines, mid, monkeypatch, interval, max_tokens):
    """The caller closes its stream as soon as it has its last token (before the Final, which
    the end reads now follow): the request ends once, as 'length' (its end ran before the cancel),
    with one time to first token, one end and one attention mass; the engine is idle after."""
    from services.generator import running_request

    engine = engines[interval]
    monkeypatch.setattr(running_request.Handover, "URGENT_WAIT", 30.0)
    keys = [
        ("extmind_generator_time_to_first_token_seconds_count", {}),
        ("extmind_generator_request_seconds_count", {"finish_reason": "length"}),
        ("extmind_generator_request_seconds_count", {"finish_reason": "cancelled"}),
        ("extmind_generator_memory_attention_share_count", {}),
    ]
    before = [sample(n, **lb) for n, lb in keys]
    req = GenerationRequest(engine.tokenizer.encode(PROMPT), Sampling(max_tokens=max_tokens), opts(mid, True, "local"))
    evs = await stream(engine, req, close_after=max_tokens)
    assert len(tokens_of(evs)) == max_tokens and all(isinstance(ev, Chunk) for ev in evs)
    await idle(engine)
    after = [sample(n, **lb) for n, lb in keys]
    assert [a - b for a, b in zip(after, before)] == [1, 1, 0, 1]


async def test_callers_on_two_loops_ending_in_one_step_get_every_token(engines, mid):
    """Citing requests from two threads (each its own event loop), one and several tokens long,
    on an engine that holds tokens for the interval: each caller gets its tokens once, in order,
    then its Final, as a lone run of the same request does."""
    quick, slow = engines[0.0], engines[60_000.0]
    reqs = [
        GenerationRequest(quick.tokenizer.encode(p), Sampling(max_tokens=n), opts(mid, True, "local"))
        for p, n in (("Water boils at", 1), ("Alice met Bob at", 5), ("Rome is the", 5), ("Paris is", 1))
    ]
    want = [await stream(quick, r) for r in reqs]
    for got in on_two_loops(lambda r: stream(slow, r), reqs):
        for evs, w in zip(got, want):
            assert_well_formed(evs)
            assert tokens_of(evs) == tokens_of(w)
            assert final_fields(evs[-1])[:3] == final_fields(w[-1])[:3] and evs[-1].citations
    await idle(slow)


@pytest.mark.parametrize("max_tokens", [1, 3])
async def test_citations_that_cannot_be_read_at_the_end_give_the_tokens_then_the_error(
    engines, mid, monkeypatch, max_tokens
):
    """The citing request's counts fail at its end (after its last token left): its caller gets
    every token, then INTERNAL and nothing else; a request of its batch without citations ends
    with its Final, and the engine is idle after."""
    from services.generator import citations, running_request

    engine = engines[60_000.0]
    monkeypatch.setattr(running_request.Handover, "URGENT_WAIT", 30.0)

    def read(self):
        raise RuntimeError("the counts could not be read")

    monkeypatch.setattr(citations.Counts, "read", read)
    reqs = [
        GenerationRequest(engine.tokenizer.encode(p), Sampling(max_tokens=max_tokens), opts(mid, cite, "local"))
        for p, cite in (("Water boils at", True), ("Alice met Bob at", False))
    ]
    citing, plain = await _together(engine, reqs)
    for evs in (citing, plain):
        assert_well_formed(evs)
        assert len(tokens_of(evs)) == max_tokens
    assert isinstance(citing[-1], errors.Internal) and "could not be read" in str(citing[-1])
    assert isinstance(plain[-1], Final) and plain[-1].finish_reason == "length"
    await idle(engine)
