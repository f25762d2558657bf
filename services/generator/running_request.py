"""A request admitted to the scheduler, and how its events reach the caller's event loop."""

from __future__ import annotations

import asyncio
import collections
import threading
import time

from services.generator import attention_mass
from services.generator.citations import Counts
from services.generator.memory_resolution import ResolvedMemory
from services.generator.request_types import Chunk, GenerationRequest
from services.generator.stop_text import StopText


class RunningRequest:
    """One admitted generation: where its events go and how far it got."""

    def __init__(
        self,
        req: GenerationRequest,
        loop: asyncio.AbstractEventLoop,
        detokenizer,
        max_tokens: int,
        arrived: float | None = None,
    ):
        self.req = req
        self.arrived = time.monotonic() if arrived is None else arrived  # for the latency metrics
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()  # Chunk..., then a Final or an exception
        self._outbox: collections.deque = collections.deque()  # posted, not yet in events
        # Counts of events posted, released by a hand-over (the loop moves only those: an event
        # posted after a hand-over waits for the next one, even when a wake-up is still pending)
        # and moved to events. Posted and released are the MLX thread's, delivered the loop's.
        # While more are posted than released, the request waits in Handover.posted.
        self._posted = self._released = self._delivered = 0
        self._wake = False  # a wake-up was sent and its delivery has not run yet
        self._first = True  # no Chunk delivered yet: the first one goes alone (time to first token)
        self.text = StopText(detokenizer, tuple(req.sampling.stop))
        self.max_tokens = max_tokens
        self.generated = 0  # tokens the model produced (EOS included)
        self.group = None  # its decode_group.DecodeGroup
        self.uid: int | None = None
        self.done = False
        self.memories: list[ResolvedMemory] = []
        self.counts: Counts | None = None  # retrieval counts on the device (citations only)
        self.mass: attention_mass.MassSum | None = None  # memory share sums (requests with memories)
        self.sampler = None  # as given to the BatchGenerator, kept for decoding solo (solo.py)
        self.processors: list = []
        # The request's own metric observations (time to first token, its end, its memory share)
        # while it runs on a guess of its memories (memory_lookup.py): held until its lookup
        # confirms the guess, dropped otherwise (a run dropped for Stale, a failed lookup, a caller
        # gone first), so each request is observed once, as one that looked up first. None: at once.
        self._held: list | None = None
        self._dropped = False
        self._held_lock = threading.Lock()  # the scheduler observes on the MLX thread

    def hold_observations(self) -> None:
        """From now on ``observe`` holds its observations until ``settle`` (before the admission)."""
        self._held = []

    def observe(self, fn, *args) -> None:
        """``fn(*args)`` (a metric's observation) now, or when ``settle`` keeps the held ones (any thread)."""
        with self._held_lock:
            if self._dropped:
                return
            if self._held is not None:
                self._held.append((fn, args))
                return
        fn(*args)

    def settle(self, keep: bool) -> None:
        """Makes the held observations (``keep``) and observes at once from now on, or drops them
        and every later one (the caller never saw this run). No-op unless held."""
        with self._held_lock:
            held, self._held = self._held, None
            self._dropped = self._dropped or (held is not None and not keep)
        for fn, args in held if keep and held else ():
            fn(*args)

    def post(self, event) -> bool:
        """Queues ``event`` for the caller (on the MLX thread). -> whether the request must join
        the next hand-over's list (``Handover.posted``): False when it is in it already."""
        self._outbox.append(event)
        listed = self._posted > self._released  # events of it wait for a hand-over already
        self._posted += 1
        return not listed

    def release(self) -> bool:
        """Hands over every event posted so far (on the MLX thread, ``Handover.hand_over``).
        -> whether the caller's loop must be woken for them (``wake_loops``); False while an
        earlier wake-up has not run: its delivery takes them, as it moves what is released when
        it runs. Events posted after this wait for the next hand-over, so a Final posted after
        the step's tokens never rides on their wake-up before the gauges it follows are set."""
        self._released = self._posted
        if self._wake:
            return False
        self._wake = True
        return True

    def _deliver(self) -> None:  # on the caller's loop
        """Moves the released events (``release``) to ``events``, consecutive Chunks joined: the
        caller handles (sends, renders) one message for the tokens of several steps when they came
        together, not one per token. Chunks without text after the last one with text stay a Chunk of
        their own: their tokens' text is held back (a stop string may still cut it off), and a
        caller showing tokens with their text (openai_responses.Answer) holds them too. The
        request's first Chunk is never joined: its first token is its own message (generator.proto,
        GenerateStream), even when this runs after later tokens were posted (a busy loop)."""
        self._wake = False  # first: an event released from here on asks for another wake-up
        n = self._released - self._delivered
        self._delivered += n
        out = collections.deque(self._outbox.popleft() for _ in range(n))
        while out:
            ev = out.popleft()
            first = self._first and isinstance(ev, Chunk)
            self._first = self._first and not first
            if first or not (isinstance(ev, Chunk) and out and isinstance(out[0], Chunk)):
                self.events.put_nowait(ev)
                continue
            run = [ev]
            while out and isinstance(out[0], Chunk):
                run.append(out.popleft())
            cut = max((i + 1 for i, c in enumerate(run) if c.text), default=0)
            for part in (run[:cut], run[cut:]):
                if part:
                    self.events.put_nowait(Chunk.joined(part))


class Handover:
    """The events posted on the MLX thread and when they leave for the callers' loops
    (docs/architecture.md, "Handing tokens to the callers"): at most one wake-up per loop per
    ``interval`` seconds while only tokens wait; an urgent event (a first token, a last event, an
    error) and a flush take everything at once.

    After an urgent wake-up the MLX thread waits (GIL released) until each woken loop has handed
    the events on, at most URGENT_WAIT seconds: a loop woken while the MLX thread builds the next
    steps' graphs, holding the GIL, would otherwise get it only at CPython's forced switches (5 ms
    each, a few per hand-over), which on a fast GPU doubled a lone request's time to first token."""

    URGENT_WAIT = 0.002

    def __init__(self, interval: float):
        self.interval = interval
        self.posted: list[RunningRequest] = []  # requests with events since the last wake-up
        self._last = 0.0
        self._urgent = False  # a posted event must not wait for the interval

    def post(self, r: RunningRequest, event, urgent: bool = True) -> None:
        """Queues ``event`` for ``r``'s caller (on the MLX thread)."""
        self._urgent = self._urgent or urgent
        if r.post(event):
            self.posted.append(r)

    def hand_over(self, flush: bool = False) -> None:
        """Releases what was posted to the callers and wakes their loops, when due (or
        ``flush``). Each wake-up is a syscall and a trade of the GIL between the MLX thread and
        the loop's thread, which on a fast GPU cost a token's decode more than the model's Python
        does: a request whose last wake-up has not run yet gets none (that one delivers what is
        released now), and the MLX thread does not wait for it."""
        if not self.posted:
            self._urgent = False
            return
        now = time.monotonic()
        urgent = self._urgent
        if not (flush or urgent or now - self._last >= self.interval):
            return
        posted, self.posted = self.posted, []
        self._last, self._urgent = now, False
        wake = [r for r in posted if r.release()]
        if wake:
            wake_loops(wake, wait=self.URGENT_WAIT if urgent else 0.0)


def wake_loops(requests: list[RunningRequest], wait: float = 0.0) -> None:
    """Hands the events posted to ``requests`` to their callers (from the MLX thread): one
    wake-up per event loop for all of its requests (after a decode step, every stream has a new
    token), not one per request. wait: seconds at most to wait for the loops to have handed the
    events on (their callers' tasks ran a step with them; Handover)."""
    by_loop: dict = {}
    for r in requests:
        by_loop.setdefault(r.loop, []).append(r)
    acks = []
    for loop, rs in by_loop.items():
        ack = threading.Event() if wait > 0 else None
        try:
            loop.call_soon_threadsafe(_deliver_all, rs, ack)
        except RuntimeError:  # the caller's loop is gone
            continue
        if ack is not None:
            acks.append(ack)
    deadline = time.monotonic() + wait
    for ack in acks:
        ack.wait(max(0.0, deadline - time.monotonic()))


def _deliver_all(requests: list[RunningRequest], ack: threading.Event | None = None) -> None:  # on the callers' loop
    for r in requests:
        r._deliver()
    if ack is not None:
        # Queued behind the wake-ups of the tasks waiting for these events: set once they ran.
        asyncio.get_running_loop().call_soon(ack.set)
