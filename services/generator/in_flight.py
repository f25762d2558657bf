"""The scheduler's requests in flight, from their tokens to their ends (scheduler.py).

``InFlight`` posts each token a step makes to its request's caller, ends the requests whose last
token came (their Final, with citations and attention mass read from the device) or that an error
ends alone (``end``), and keeps what those move: the count of requests in flight, whether the gauges must be set again,
and the hand-over of the events to the callers' loops (running_request.Handover). Everything here
runs on the MLX thread, as the scheduler's steps do.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from extmind import errors
from services.generator import attention_mass
from services.generator.citations import spans
from services.generator.request_types import LENGTH, STOP, STOP_SEQUENCE, Chunk, Final
from services.generator.running_request import Handover, RunningRequest
from services.generator.scheduler_metrics import REQUEST_SECONDS, TIME_TO_FIRST_TOKEN


class InFlight:
    """The scheduler's running requests as their callers and the gauges see them (on the MLX thread)."""

    def __init__(self, handover: Handover, decode, publish: Callable[[], None]):
        self.handover = handover  # the events for the callers' loops
        self.decode = decode  # token ids -> text (citation spans)
        self._publish = publish  # sets the waiting / running gauges (Scheduler._publish)
        self.active = 0  # requests admitted and not ended
        self.gauges_moved = False  # a request started or ended during the step: publish after it
        self.ends: list[tuple[RunningRequest, str]] = []  # (request, reason) its last token came in the step

    def admitted(self) -> None:
        """Counts in a request the scheduler just put in a group."""
        self.active += 1

    def cancelled(self, r: RunningRequest) -> None:
        """Counts out ``r``, taken out of its group because its caller went away (no event to post)."""
        self.active -= 1
        observe_end(r, "cancelled")

    def fail(self, requests: list[RunningRequest], err: Exception) -> None:
        """Ends ``requests`` (already out of their group's step) with ``err`` as their callers' last event."""
        for r in requests:
            r.done = True
            observe_end(r, "error")
            self.handover.post(r, err)
        self.active -= len(requests)
        self.gauges_moved = True

    def clear(self) -> None:
        """Forgets every request (the scheduler ended them all): no pending end is ended again."""
        self.ends.clear()
        self.active = 0

    def on_token(self, r: RunningRequest, resp) -> None:
        """Posts ``r``'s token (a Chunk, unless it is EOS); its last one queues its end for
        ``finish_ends``, once the step's tokens are all posted."""
        tok = int(resp.token)
        r.generated += 1
        if r.generated == 1:
            r.observe(TIME_TO_FIRST_TOKEN.observe, time.monotonic() - r.arrived)
            self.gauges_moved = True  # from waiting to running
        if resp.finish_reason == "stop":  # an EOS token (the only stop sequences given to mlx-lm)
            self.ends.append((r, STOP))
            return
        lp = [float(resp.logprobs[tok].item())] if r.req.return_logprobs else []
        top = [_top(resp.logprobs, r.req.top_logprobs)] if r.req.return_logprobs and r.req.top_logprobs else []
        last = resp.finish_reason == "length"
        piece, stopped = r.text.push(tok, last)
        self.handover.post(r, Chunk(piece, [tok], lp, top), urgent=r.generated == 1)
        if stopped:
            r.group.remove(r.uid)
            self.ends.append((r, STOP_SEQUENCE))
        elif last:
            self.ends.append((r, LENGTH))

    def finish_ends(self) -> None:
        """Ends the requests whose last token the step made (``_finish``). Those with
        memories read the device at their end (citation counts, attention mass): the tokens posted
        so far leave before those reads (when due: a first token always, else by the stream
        interval), so that a one-token request's only token (a prefill's time to first token) does
        not wait for them (docs/architecture.md, "Handing tokens to the callers"). One hand-over
        for all of the step's ends, not one each (an urgent one waits for the callers' loops), and
        after the step's token count and the gauges moved: it may carry the Finals of requests
        that ended earlier in this pass, whose callers read those settled."""
        if not self.ends:  # most steps
            return
        ends, self.ends = self.ends, []
        if any(r.counts is not None or r.mass is not None for r, _ in ends):
            if self.gauges_moved:
                self._publish()
            self.handover.hand_over()
        for r, reason in ends:
            self._finish(r, reason)

    def _finish(self, r: RunningRequest, reason: str) -> None:
        """Ends ``r`` with its Final (its citations and attention mass read from the device, the text
        held back released), or with an error when its citations cannot be read."""
        citations, counts = [], None
        if r.counts is not None:
            try:
                r.group.counts.flush()
                counts = r.counts.read()
                r.counts = None
                citations = spans(counts, r.memories, self.decode, r.req.memory.max_citations)
            except Exception as e:  # noqa: BLE001
                self.end(r, errors.ours_or_internal(e, "citations failed"))
                return
        if r.mass is not None:
            try:
                r.group.mass.flush()
                means = r.mass.means()  # the one read of the request's sums
            except Exception as e:  # noqa: BLE001 - a metric never fails a request
                r.group.stop_measuring_mass(e)
            else:
                r.observe(attention_mass.observe, means)
            r.mass = None
        rest = ""
        if reason != STOP_SEQUENCE:
            # The text released only now (held back, or flushed at the end) may complete a stop string.
            rest, stopped = r.text.finish()
            if stopped:
                reason = STOP_SEQUENCE
        self.end(r, Final(reason, len(r.req.prompt_tokens), r.generated, citations, rest, counts))

    def end(self, r: RunningRequest, last) -> None:
        """Takes ``r`` out of its group and hands its caller the last event (a Final or an error)."""
        r.group.requests.pop(r.uid, None)
        self.active -= 1
        r.done = True
        self.gauges_moved = True
        observe_end(r, last.finish_reason if isinstance(last, Final) else "error")
        self.handover.post(r, last)


class SoloToken(NamedTuple):
    """A solo step's token, shaped as the BatchGenerator's response ``InFlight.on_token`` reads."""

    token: int
    logprobs: mx.array
    finish_reason: str | None


def observe_end(r: RunningRequest, how: str) -> None:
    """Observes ``r``'s seconds from its arrival to its end, by ``how`` it ended."""
    r.observe(REQUEST_SECONDS.labels(how).observe, time.monotonic() - r.arrived)


def _top(logprobs: mx.array, k: int) -> list[tuple[int, float]]:
    """The ``k`` most likely (token id, logprob) of one step's [vocab] logprobs, best first."""
    ids = np.asarray(mx.argpartition(-logprobs, k - 1)[:k])
    values = np.asarray(logprobs[mx.array(ids)], dtype=np.float32)
    order = np.argsort(-values, kind="stable")
    return [(int(ids[i]), float(values[i])) for i in order]
