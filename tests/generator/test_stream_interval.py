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

from .helpers import events, on_two_loops, until

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


async def test_a_long_interval_wakes_the_loop_for_urgent_events_only_and_loses_nothing(engines, monkeypatch):
    quick, slow = engines[0.0], engines[60_000.0]
    req = GenerationRequest(quick.tokenizer.encode(PROMPT), Sampling(max_tokens=40), None, True, 2)
    want, want_final = await events(quick, req)
    loop = asyncio.get_running_loop()
    wakes = []
    plain = loop.call_soon_threadsafe
    monkeypatch.setattr(loop, "call_soon_threadsafe", lambda *a, **k: wakes.append(a) or plain(*a, **k))
    chunks, final = await events(slow, req)
    # The first token alone and at once, the rest joined: the same tokens, logprobs, top
    # logprobs and text as handed over step by step.
    assert len(chunks[0].token_ids) == 1 and len(chunks) <= 8  # of 40 tokens
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
    # Tokens held (read from here, not through the MLX thread: a call there flushes them); the
    # work below is queued only then, so that the step it interrupts has something to flush.
    deadline = time.monotonic() + 60
    while not slow._scheduler._flight.handover.posted and time.monotonic() < deadline:
        await asyncio.sleep(0.001)

    def work():  # other work on the MLX thread: nothing is held while it runs
        held = list(slow._scheduler._flight.handover.posted)
        time.sleep(1.5)
        return held

    busy = asyncio.ensure_future(slow.mlx.run(work))
    nxt = await asyncio.wait_for(anext(stream), timeout=60)
    assert isinstance(nxt, Chunk) and nxt.token_ids and not busy.done()  # flushed before the work ran
    assert await busy == []
    await stream.aclose()


async def test_a_joined_chunk_keeps_tokens_whose_text_is_held_back_apart():
    """A Chunk without text carries tokens whose text a stop string may still cut off; joined
    after text, they would be shown with it (openai_responses.Answer shows a Chunk's tokens with
    its text). So they stay a Chunk of their own, and runs with text in them are joined."""
    r = RunningRequest(GenerationRequest([1]), asyncio.get_running_loop(), None, 8)
    r.post(Chunk("", [9], [-9.0]))  # the first token: a Chunk of its own, whatever follows it
    r.release()
    r._deliver()
    assert r.events.get_nowait() == Chunk("", [9], [-9.0])
    posted = [Chunk("", [1], [-1.0]), Chunk(" is", [2], [-2.0]), Chunk("", [3], [-3.0]), Chunk("", [4], [-4.0])]
    for c in posted:
        r.post(c)
    r.post(Final("stop_sequence", 1, 4))
    r.release()
    r._deliver()
    got = [r.events.get_nowait() for _ in range(r.events.qsize())]
    assert got == [Chunk(" is", [1, 2], [-1.0, -2.0]), Chunk("", [3, 4], [-3.0, -4.0]), Final("stop_sequence", 1, 4)]


# --- breaker3: joined Chunks against step-by-step ones, through every consumer -------------------


def _answers(engine_events, req_obj, tokenizer):
    """(streamed text, streamed logprobs entries, finish reasons, whole body) of one generation's
    events rendered by openai_responses.Answer, both ways (stream and whole)."""
    from services.generator.openai_responses import Answer

    stream = Answer(req_obj, "m", "fp", lambda t: tokenizer.decode([t]))
    whole = Answer(req_obj, "m", "fp", lambda t: tokenizer.decode([t]))
    objs = [o for o in [stream.first_chunk()] if o is not None]
    for ev in engine_events:
        if isinstance(ev, Chunk):
            whole.add(ev)
            if (o := stream.stream_chunk(ev)) is not None:
                objs.append(o)
        else:
            whole.end(ev)
            objs += stream.last_chunks(ev)
    chat = stream.chat
    text, entries, reasons, offsets = "", [], [], []
    for o in objs:
        for ch in o["choices"]:
            text += ch["delta"].get("content", "") if chat else ch["text"]
            lp = ch["logprobs"]
            if lp is not None:
                if chat:
                    entries += lp["content"]
                else:
                    entries += list(zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"] or [None] * 99))
                    offsets += lp["text_offset"]
            reasons.append(ch["finish_reason"])
    body = whole.body()
    for key in ("id", "created"):
        body.pop(key)
    return text, entries, [r for r in reasons if r], offsets, body


@pytest.mark.parametrize("stop", [(), ("ntion b",), ("ind",), ("le", "xyz"), ("\ufffd_ b",)])
@pytest.mark.parametrize("obj", ["chat.completion", "text_completion"])
async def test_joined_chunks_render_as_step_by_step_ones_in_the_openai_answers(engines, stop, obj):
    """Stop strings whose start is held back (Chunks without text) across joined Chunks: the
    OpenAI face's text, logprobs (tokens, top alternatives, text offsets) and finish reason are
    those of the step-by-step stream."""
    from services.generator.openai_protocol import OpenAIRequest

    quick, slow = engines[0.0], engines[60_000.0]
    req = GenerationRequest(quick.tokenizer.encode(PROMPT), Sampling(max_tokens=60, stop=stop), None, True, 3)
    out = {}
    for name, e in (("quick", quick), ("slow", slow)):
        events = [ev async for ev in e.generate(req)]
        out[name] = events
    assert len(out["slow"]) < len(out["quick"])  # tokens were joined
    oreq = OpenAIRequest(obj, logprobs=True, top_logprobs=3, stream=True)
    want = _answers(out["quick"], oreq, quick.tokenizer)
    got = _answers(out["slow"], oreq, quick.tokenizer)
    assert got == want
    assert want[0] == want[4]["choices"][0].get("text", want[4]["choices"][0].get("message", {}).get("content"))


async def test_streams_of_two_event_loops_get_every_token(engines):
    """Requests from two threads, each with its own event loop, on an engine that holds tokens
    for the interval: each loop gets its own requests' tokens, all of them, in order."""
    quick, slow = engines[0.0], engines[60_000.0]
    prompts = [PROMPT, "Alice met Bob at the", "One two three four"]
    reqs = [GenerationRequest(quick.tokenizer.encode(p), Sampling(max_tokens=50), None, True) for p in prompts]
    want = [await events(quick, r) for r in reqs]
    # six in a batch: logprobs within rounding of the lone runs'
    for got in on_two_loops(lambda r: events(slow, r), reqs):
        for (chunks, final), (want_chunks, want_final) in zip(got, want):
            g, w = Chunk.joined(chunks), Chunk.joined(want_chunks)
            assert (g.text, g.token_ids, final) == (w.text, w.token_ids, want_final)
            assert len(g.logprobs) == len(w.logprobs) and len(chunks[0].token_ids) == 1


async def test_a_cancelled_stream_leaves_the_others_flowing(engines):
    """One stream closed early (its request cancelled) while others of its batch and another group
    run on: the others get every token and their Final; nothing waits for an end."""
    quick, slow = engines[0.0], engines[60_000.0]
    reqs = [
        GenerationRequest(quick.tokenizer.encode(p), Sampling(max_tokens=n))
        for p, n in ((PROMPT, 80), ("Alice met Bob at the", 300), ("One two", 5))
    ]
    want = [await events(quick, r) for r in reqs[:1] + reqs[2:]]

    async def cancelled():
        stream = slow.generate(reqs[1])
        got = 0
        async for ev in stream:
            got += len(ev.token_ids)
            if got >= 3:
                break
        await stream.aclose()
        return got

    outs = await asyncio.wait_for(
        asyncio.gather(events(slow, reqs[0]), cancelled(), events(slow, reqs[2])), timeout=120
    )
    for (chunks, final), (want_chunks, want_final) in zip([outs[0], outs[2]], want):
        g, w = Chunk.joined(chunks), Chunk.joined(want_chunks)
        assert (g.text, g.token_ids, final) == (w.text, w.token_ids, want_final)
    assert outs[1] >= 3
    assert slow.mlx.call(slow._scheduler.stats) == {"active": 0, "groups": 0}


@pytest.mark.parametrize("interval", [0.0, 60_000.0])
async def test_the_first_token_comes_alone_even_when_the_loop_is_late(engines, interval):
    """GenerateStream's contract (generator.proto) and the bench's time to first token: the first
    Chunk carries the first token only, also when the caller's loop runs its delivery after the
    MLX thread has posted more tokens (a busy loop: here blocked until 3 tokens exist)."""
    engine = engines[interval]
    req = GenerationRequest(engine.tokenizer.encode(PROMPT), Sampling(max_tokens=30), None, True)
    want, want_final = await events(engines[0.0], req)
    stream = engine.generate(req)
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0)  # the generation runs up to its admit, submitted to the MLX thread

    def generated():
        return sum(r.generated for g in engine._scheduler._groups.values() for r in g.requests.values())

    deadline = time.monotonic() + 60
    while engine.mlx.call(generated) < 3 and time.monotonic() < deadline:  # the loop blocked meanwhile
        time.sleep(0.005)
    chunks = [await first]
    async for ev in stream:
        chunks.append(ev)
    final = chunks.pop()
    assert len(chunks[0].token_ids) == 1, chunks[0]
    assert Chunk.joined(chunks) == Chunk.joined(want) and final == want_final


async def test_stopping_the_engine_hands_over_the_held_tokens_then_unavailable(engines, llama_path):
    """engine.stop() while tokens are held for the interval: the caller gets them (a prefix of the
    step-by-step stream, past the first token), then UNAVAILABLE; nothing is lost or left waiting."""
    from extmind import errors

    quick = engines[0.0]
    req = GenerationRequest(quick.tokenizer.encode(PROMPT), Sampling(max_tokens=300))
    want, _ = await events(quick, req)
    engine = GeneratorEngine(EngineConfig(model=str(llama_path), stream_interval_ms=60_000.0))
    engine.start()
    try:
        stream = engine.generate(req)
        got = [await anext(stream)]
        deadline = time.monotonic() + 60
        while not engine._scheduler._flight.handover.posted and time.monotonic() < deadline:  # tokens held
            await asyncio.sleep(0.001)
        await asyncio.to_thread(engine.stop)
        with pytest.raises(errors.Unavailable):
            async for ev in stream:
                got.append(ev)
        tokens = Chunk.joined(got).token_ids
        assert len(tokens) >= 2 and tokens == Chunk.joined(want).token_ids[: len(tokens)]
    finally:
        engine.stop()


async def test_an_urgent_hand_over_returns_once_the_caller_has_the_event(engines, monkeypatch):
    """After waking a loop for a first token (or an end), the MLX thread waits until the caller's
    task ran with it (Handover.URGENT_WAIT; here long enough to be sure), so the loop does not
    queue for the GIL behind the next steps' graph building: the caller has its first token before
    the scheduler steps on."""
    from services.generator import running_request

    engine = engines[60_000.0]
    monkeypatch.setattr(running_request.Handover, "URGENT_WAIT", 30.0)
    order = []
    plain = running_request.wake_loops

    def wake_loops(requests, wait=0.0):
        plain(requests, wait)
        order.append(("returned", wait > 0))

    monkeypatch.setattr(running_request, "wake_loops", wake_loops)
    req = GenerationRequest(engine.tokenizer.encode(PROMPT), Sampling(max_tokens=20), None, True)
    async for ev in engine.generate(req):
        order.append(("received", type(ev).__name__))
    # two wake-ups (the first token; the Final): the long interval holds the tokens in between
    await until(lambda: sum(o[0] == "returned" for o in order) == 2, "the Final's hand-over returned")
    # the first token's hand-over and the Final's (the last one) returned after the caller had them
    assert order[0] == ("received", "Chunk") and order[1] == ("returned", True), order
    assert order[-2:] == [("received", "Final"), ("returned", True)], order


async def test_an_urgent_hand_over_waits_for_a_busy_loop_at_most_urgent_wait(monkeypatch):
    """A caller's loop that does not run (blocked here for a second) holds the MLX thread no longer
    than URGENT_WAIT after an urgent event, and not at all after tokens handed over by the
    interval; the events reach the caller once its loop runs."""
    import threading

    from services.generator.running_request import Handover

    monkeypatch.setattr(Handover, "URGENT_WAIT", 0.1)
    loop = asyncio.get_running_loop()
    for urgent in (True, False):
        r = RunningRequest(GenerationRequest([1, 2], Sampling(max_tokens=4)), loop, None, 4)
        handover = Handover(interval=0.0)
        chunk = Chunk("a", [1], [-0.5], [])
        handover.post(r, chunk, urgent=urgent)
        took = []

        def mlx_side(h=handover, took=took):
            t0 = time.monotonic()
            h.hand_over()
            took.append(time.monotonic() - t0)

        side = threading.Thread(target=mlx_side)
        side.start()
        time.sleep(1.0)  # the loop's thread is busy: the wake-up cannot run meanwhile
        side.join(timeout=30)
        assert took and took[0] < 0.8, (urgent, took)  # waited 0.1 s at most, not for the loop
        assert await asyncio.wait_for(r.events.get(), 10) is chunk


async def test_an_urgent_event_behind_a_pending_wake_up_leaves_no_urgency_behind(monkeypatch):
    """An urgent event (an end) posted to a request whose loop has a wake-up pending travels with
    that wake-up: no other wake-up is due for it. The tokens of another request posted later
    still wait for the interval, and the MLX thread does not wait on their hand-over."""
    from services.generator import running_request
    from services.generator.running_request import Handover

    monkeypatch.setattr(Handover, "URGENT_WAIT", 0.0)  # the loop is this test's: it cannot run meanwhile
    waits = []
    plain = running_request.wake_loops
    monkeypatch.setattr(running_request, "wake_loops", lambda rs, wait=0.0: waits.append(wait) or plain(rs, wait))
    loop = asyncio.get_running_loop()
    a, b = (RunningRequest(GenerationRequest([1, 2], Sampling(max_tokens=4)), loop, None, 4) for _ in range(2))
    handover = Handover(interval=3600.0)
    first, final = Chunk("a", [1], [-0.5], []), Final("stop", 2, 1, [], "", None)
    handover.post(a, first)  # urgent: a's loop is woken (its wake-up pending until this test awaits)
    handover.hand_over()
    assert handover.posted == [] and len(waits) == 1
    handover.post(a, final)  # urgent, but a's wake-up is still pending: it takes the Final along
    handover.hand_over()
    handover.post(b, Chunk("b", [3], [-0.5], []), urgent=False)  # a token within the interval
    handover.hand_over()
    assert handover.posted == [b] and len(waits) == 1, waits  # held for the interval
    assert await asyncio.wait_for(a.events.get(), 10) is first
    assert await asyncio.wait_for(a.events.get(), 10) is final


@pytest.mark.parametrize("cite", [False, True])
async def test_a_request_with_memories_gets_its_last_token_before_its_end_reads_the_device(
    engine, memory, monkeypatch, cite
):
    """A request with memories ends by reading its attention mass (and citation counts) from the
    device: its last token is handed over before those reads, so a one-token request's only token
    (a prefill's time to first token) does not wait for them; the Final follows with the counts."""
    from services.generator import attention_mass, citations, running_request
    from services.generator.request_types import MemoryOptions

    monkeypatch.setattr(running_request.Handover, "URGENT_WAIT", 30.0)  # the caller surely ran
    order = []

    def recorded(name, read):
        def call(self):
            order.append(name)
            return read(self)

        return call

    monkeypatch.setattr(attention_mass.MassSum, "means", recorded("mass read", attention_mass.MassSum.means))
    monkeypatch.setattr(citations.Counts, "read", recorded("counts read", citations.Counts.read))
    mid, _ = memory
    req = GenerationRequest(
        engine.tokenizer.encode(PROMPT), Sampling(max_tokens=1), MemoryOptions((mid,), return_citations=cite)
    )
    async for ev in engine.generate(req):
        order.append(type(ev).__name__)
    assert order == ["Chunk", *(["counts read"] if cite else []), "mass read", "Final"], order
    if cite:
        assert ev.row_counts is not None and ev.row_counts.sum() > 0  # counted and read after the token left


async def test_an_event_posted_after_a_hand_over_waits_for_the_next_one(monkeypatch):
    """A wake-up already sent delivers only what its hand-over released: an event posted after it
    (a Final posted after the step's tokens left, before the step's gauges were set) waits for
    the next hand-over, however late the loop runs the pending wake-up."""
    from services.generator.running_request import Handover

    monkeypatch.setattr(Handover, "URGENT_WAIT", 0.0)  # the loop is this test's: it cannot run meanwhile
    r = RunningRequest(GenerationRequest([1, 2], Sampling(max_tokens=4)), asyncio.get_running_loop(), None, 4)
    handover = Handover(interval=0.0)
    first, final = Chunk("a", [1], [-0.5], []), Final("length", 2, 1, [], "", None)
    handover.post(r, first)
    handover.hand_over()  # a wake-up sent; the loop has not run it yet
    handover.post(r, final)  # posted after that hand-over
    for _ in range(5):
        await asyncio.sleep(0)  # the pending wake-up runs
    assert r.events.get_nowait() is first
    assert r.events.empty()  # the Final was not released with it
    handover.hand_over()
    assert await asyncio.wait_for(r.events.get(), 10) is final
