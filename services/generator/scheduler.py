"""Continuous batching: mlx-lm ``BatchGenerator``s driven one step at a time.

Requests are grouped by what they attend to (memory set + top_k + threshold + layers + mode):
each group is one ``BatchGenerator``, and requests without memories form their own group, which
runs stock mlx-lm. While a group's decode batch is a single sequence and nothing else of the group
is queued or prefilling, that sequence is stepped solo by mlx-lm's ``generate_step`` (solo.py,
cheaper per token), and goes back into the BatchGenerator when another request joins; a request
that finds its group empty starts solo from its prompt.

Threads. MLX work runs on the process's one MLX thread, and there is one way to put work there:
``MLXThread.call`` / ``run`` / ``submit``. The scheduler is a plain thread of its own that
submits *steps* (every group's ``next()``) through that same door and waits for them,
so everything else queued on the MLX thread (admitting a request, cancelling one, a memorize
window, ``stats``) runs between two steps, in arrival order; while nothing is queued, one
submission runs several steps back to back (``_steps``). The scheduler thread sleeps on an
event while no group has work. All scheduler state (groups, requests, counts) is only touched
on the MLX thread; callers get plain Python events through their request's asyncio queue
(in_flight.py posts a request's tokens and ends it), handed over with one wake-up per event loop
for all of its requests, at most once per stream interval while only tokens wait
(running_request.Handover).

Metrics (docs/architecture.md, "Metrics"; scheduler_metrics.py): the counts move on the MLX thread
from host-side state only; the attention-mass sums stay on the device until a request ends (attention_mass.py).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading

from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import KVCache, make_prompt_cache

from extmind import errors
from services.common.mlx_thread import MLXThread
from services.generator import attention_mass, prefill_attention
from services.generator.citations import Counts
from services.generator.decode_group import DecodeGroup, unpadded_caches
from services.generator.extended_attention import ExtendedMindState
from services.generator.in_flight import InFlight, SoloToken
from services.generator.memory_resolution import ResolvedMemory
from services.generator.running_request import Handover, RunningRequest
from services.generator.sampling import logits_processors_for, sampler_for
from services.generator.scheduler_metrics import (
    GENERATED_TOKENS,
    PROMPT_TOKENS,
    RUNNING,
    SOLO,
    WAITING,
)
from services.generator.solo import Solo

log = logging.getLogger("extmind.generator")


class Scheduler:
    """Owns the groups. ``admit``, ``cancel``, ``stats`` and ``close_all`` run on the MLX thread."""

    STEPS_PER_CALL = 32
    # A hand-over to solo costs about one forward (solo.py) and saves a fraction of each step
    # after it, so a sequence goes solo once it has decoded alone for this many batch steps and
    # may still make this many tokens: a short request, or one that is joined again soon, stays
    # batched (and a group whose requests come and go does not switch at every change).
    SOLO_AFTER = 8
    # A request admitted to an empty group starts solo from its prompt.
    SOLO_FROM_PROMPT = True

    def __init__(
        self,
        mlx: MLXThread,
        model,
        state: ExtendedMindState,
        *,
        eos_ids,
        decode,
        max_batch_size: int,
        prefill_batch_size: int,
        prefill_step_size: int,
        max_queue: int,
        stream_interval: float = 0.0,
        vocab_size: int | None = None,
        attention_mass_every: int = 1,
    ):
        self._mlx = mlx
        self.model = model
        self.state = state
        self.eos_ids = list(eos_ids)
        self.max_batch_size = max_batch_size
        self.prefill_batch_size = prefill_batch_size
        self.prefill_step_size = prefill_step_size
        self.max_queue = max_queue
        self.vocab_size = vocab_size  # the logits' width: a top_k of it or more keeps every token
        self.attention_mass_every = attention_mass_every  # decode steps per measured one; 0 = none
        self.num_layers = len(model.layers)
        self._eos = frozenset(self.eos_ids)
        # Solo decode (solo.py) hands a KVCache over and trims it: only for models whose caches are
        # plain KVCaches (what the BatchGenerator's BatchKVCache gives back).
        self._solo_ok = all(type(c) is KVCache for c in make_prompt_cache(model))
        self._solo_uids = itertools.count(-1, -1)  # requests that start solo: uids no BatchGenerator gives
        self._groups: dict = {}
        # Tokens and ends to the callers (tokens leave at most once per stream_interval seconds),
        # the count of requests in flight and whether the gauges moved.
        self._flight = InFlight(Handover(stream_interval), decode, self._publish)
        self._has_work = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- the scheduler thread

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="generator-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops stepping and fails every request still running with UNAVAILABLE."""
        if self._thread is None:
            return
        self._stopping = True
        self._has_work.set()
        self._thread.join(timeout=30)
        self._thread = None
        self._mlx.call(self.close_all)

    def _run(self) -> None:
        # _stopping is checked before every wait: the last step of a batch clears _has_work on the
        # MLX thread, and may do so just after stop() set it.
        while not self._stopping:
            self._has_work.wait()
            if self._stopping:
                return
            try:
                self._mlx.call(self._steps)
            except Exception as e:  # noqa: BLE001 - a bug here must not leave callers waiting forever
                log.exception("scheduler step failed")
                self._mlx.call(self.close_all, errors.Internal(f"generation failed: {e}"))

    def _steps(self) -> None:
        """Steps back to back while nothing else waits for the MLX thread: one hand-over between
        the two threads per STEPS_PER_CALL steps at most rather than one per token, and whatever
        is submitted meanwhile (an admit, a cancel) still runs after the current step. The tokens
        held for the stream interval leave before the thread turns to other work."""
        try:
            for _ in range(self.STEPS_PER_CALL):
                self._step_all()
                if not self._groups or self._stopping or self._mlx.has_waiting():
                    return
        finally:
            self._flight.handover.hand_over(flush=True)

    def _step_all(self) -> None:
        for key, group in list(self._groups.items()):
            self._step(group)
            if not group.requests:
                group.close()
                self._groups.pop(key, None)
        if not self._groups:
            self._has_work.clear()  # on the MLX thread, so no admit can slip in between
        if self._flight.gauges_moved:
            self._publish()
        self._flight.handover.hand_over()  # after the gauges: a caller that got its Final reads them settled

    def _publish(self) -> None:
        """Sets the waiting / running gauges from the groups (host state only)."""
        waiting = sum(r.generated == 0 for g in self._groups.values() for r in g.requests.values())
        WAITING.set(waiting)
        RUNNING.set(self._flight.active - waiting)
        self._flight.gauges_moved = False

    # ---------------------------------------------------------------- on the MLX thread

    def stats(self) -> dict:
        return dict(active=sum(len(g.requests) for g in self._groups.values()), groups=len(self._groups))

    def admit(self, r: RunningRequest, key, make_context, memories: list[ResolvedMemory]) -> None:
        """Inserts ``r`` into the BatchGenerator of group ``key`` (None = no memories), making the
        group with ``make_context() -> MemoryContext | None`` when it does not exist yet.
        Raises ResourceExhausted when max_queue requests are in flight."""
        if self._flight.active >= self.max_queue:
            raise errors.ResourceExhausted(
                f"{self._flight.active} requests are in flight (limit {self.max_queue}); retry later"
            )
        group = self._groups.get(key)
        if group is None:
            ctx = make_context() if key is not None else None
            gen = BatchGenerator(
                self.model,
                stop_tokens=[[t] for t in self.eos_ids],
                completion_batch_size=self.max_batch_size,
                prefill_batch_size=self.prefill_batch_size,
                prefill_step_size=self.prefill_step_size,
            )
            group = DecodeGroup(
                key, gen, ctx, self.num_layers, host_padded=self._solo_ok, mass_every=self.attention_mass_every
            )
            self._groups[key] = group
        if group.solo is not None:  # a batch again: first, so it keeps its turn ahead of r
            self._resume(group)
        s = r.req.sampling
        r.sampler, r.processors = sampler_for(s, self.vocab_size), logits_processors_for(s)
        if not group.requests and self._solo_ok and self.SOLO_FROM_PROMPT:
            # Alone in its group: solo from the prompt (solo.py), no batch steps first.
            uid = next(self._solo_uids)
            SOLO.labels("from_prompt").inc()
            group.solo = Solo.from_prompt(
                self.model, r, r.req.prompt_tokens, r.sampler, r.processors, r.max_tokens, self.prefill_step_size
            )
        else:
            (uid,) = group.gen.insert(
                [r.req.prompt_tokens],
                max_tokens=[r.max_tokens],
                caches=[group.new_cache()],
                samplers=[r.sampler],
                logits_processors=[r.processors],
            )
        r.uid, r.group, r.memories = uid, group, memories
        m = r.req.memory
        if m is not None and m.return_citations and group.ctx is not None:
            r.counts = Counts(group.ctx.retriever.rows)
        if group.mass is not None:
            r.mass = attention_mass.MassSum(group.layers, self.state.shape.num_heads)
        group.requests[uid] = r
        self._flight.admitted()
        PROMPT_TOKENS.inc(len(r.req.prompt_tokens))
        self._publish()
        self._has_work.set()

    def cancel(self, r: RunningRequest) -> None:
        if r.done or r.group is None:
            return
        r.done = True
        if r.group.requests.pop(r.uid, None) is not None:
            self._flight.cancelled(r)
            r.group.remove(r.uid)
            self._publish()

    def close_all(self, error: errors.ExtmindError | None = None) -> None:
        """Ends every running request with ``error`` (default: shutting down, UNAVAILABLE)."""
        error = error or errors.Unavailable("the generator is shutting down; retry")
        for g in self._groups.values():
            self._flight.fail(list(g.requests.values()), error)
            g.close()
        self._groups.clear()
        self._flight.clear()  # a step that raised may have left ends: ended here, not again
        self._has_work.clear()
        self._publish()
        self._flight.handover.hand_over(flush=True)

    def _step(self, group: DecodeGroup) -> None:
        solo = group.solo
        if solo is not None and solo.untouched and not solo.deferred and self._mlx.has_waiting():
            # Started solo from its prompt, and requests admitted with it may be queued behind this
            # step: its prefill waits one pass for them, so that they share one batch prefill
            # (once: work that keeps coming must not hold it back).
            solo.deferred = True
            return
        if group.solo is None and self._solo_ok:
            r = group.alone()
            group.alone_steps = group.alone_steps + 1 if r is not None else 0
            if r is not None and group.alone_steps > self.SOLO_AFTER and r.max_tokens - r.generated >= self.SOLO_AFTER:
                self._go_solo(group, r)
        if group.solo is not None:
            self._step_solo(group)
            return
        record, mass = group.recording()
        if group.batch_changed:
            group.unpadded_caches = unpadded_caches(group.gen)
            group.batch_changed = False
        try:
            with self._attending(group, group.unpadded_caches):
                prompt_responses, responses = group.gen.next()
        except Exception as e:  # noqa: BLE001 - e.g. the memory service went away mid-step
            self._fail(group, e)
            return
        # A sequence joined (its prompt is done) or left (finished, or removed below): the decode
        # batch's padding may have changed.
        if any(p.end_of_prompt for p in prompt_responses) or any(x.finish_reason is not None for x in responses):
            group.batch_changed = True
        tokens = 0
        for resp in responses:
            r = group.requests.get(resp.uid)
            if r is not None:
                self._flight.on_token(r, resp)
                tokens += 1
        if tokens:
            GENERATED_TOKENS.inc(tokens)  # once per step: the counter takes a lock
        self._flight.finish_ends()
        started = [p.uid for p in prompt_responses if p.end_of_prompt]
        if group.resumed and started:
            # A sequence back from solo ran its last token's forward again, which the solo step
            # that made the token counted: its row of that forward goes to no one (uid None).
            started, resumed = [None if u in group.resumed else u for u in started], started
            group.resumed.difference_update(resumed)
        self._tally(group, record, mass, [x.uid for x in responses], started)

    @contextlib.contextmanager
    def _attending(self, group: DecodeGroup, unpadded: dict | None = None):
        """Points the attention state shared with the model at ``group``'s memories (and, for a
        batch, its unpadded caches) for one step's forwards, and clears it after, raising or not.
        mlx-lm's model __call__ has no argument through which memories could reach the attention
        layers, so the wrapped attention modules read them from that state; only the MLX thread
        reads or writes it, one step (or memorize chunk) at a time."""
        self.state.memory = group.ctx
        self.state.unpadded_caches = unpadded or {}
        try:
            yield
        finally:
            self.state.memory = None
            self.state.unpadded_caches = {}
            prefill_attention.forget_masks()  # the forwards' masks are not held past the step
            if group.ctx is not None:
                group.ctx.record = group.ctx.mass = None

    def _go_solo(self, group: DecodeGroup, r: RunningRequest) -> None:
        """Takes ``r``, decoding alone in ``group``, out of the BatchGenerator to step it solo."""
        ((cache, tokens),) = group.gen.remove([r.uid], return_prompt_caches=True).values()
        group.batch_changed = True
        # The decode batch's caches it left (BatchKVCaches: r's keys and values, which ``cache``
        # copied) would otherwise stay referenced here for as long as r decodes solo.
        group.unpadded_caches = {}
        group.alone_steps = 0
        SOLO.labels("handed_over").inc()
        group.solo = Solo.handed_over(
            self.model, r, cache, list(tokens), r.sampler, r.processors, r.max_tokens - r.generated
        )

    def _resume(self, group: DecodeGroup) -> None:
        """Puts the group's solo sequence back into its BatchGenerator (``DecodeGroup.resume``).
        Should that raise (its tallies could not take its pending forwards), the solo request
        ends with the error, as a request whose tally fails at its end does, and nothing else:
        left out of both the solo and the batch, it would wait forever."""
        r = group.solo.request
        SOLO.labels("resumed").inc()
        try:
            group.resume()
        except Exception as e:  # noqa: BLE001
            log.error("a solo sequence could not go back into its batch", extra={"error": str(e)})
            if group.requests.get(r.uid) is r:
                group.remove(r.uid)
                self._flight.end(r, errors.ours_or_internal(e, "generation failed"))

    def _step_solo(self, group: DecodeGroup) -> None:
        """One token of the group's solo sequence: as ``_step`` does for a batch of one."""
        solo = group.solo
        r = solo.request
        if solo.prefilling:  # started from its prompt: one prompt chunk per pass, as a batch would
            try:
                with self._attending(group):
                    solo.prefill()
            except Exception as e:  # noqa: BLE001 - as in _step
                self._fail(group, e)
            return
        record, mass = group.recording()
        try:
            with self._attending(group):
                token, logprobs = solo.step()
        except Exception as e:  # noqa: BLE001 - as in _step
            self._fail(group, e)
            return
        n = group.layers_per_forward
        if solo.repeated:  # the first forward is the batch's last one again, already counted
            solo.repeated = False
            record, mass = record and record[n:], mass and mass[n:]
        # The forwards that made this token (the last prompt token's; the first token's at the
        # step after it, solo.py) are counted now, whatever the token ends, as a batch counts the
        # forward that ends a prompt in that step; the one run ahead for the next token after it.
        made = len(record or mass or ()) - (n if solo.ahead else 0)
        if made > 0:
            self._tally(group, record and record[:made], mass and mass[:made], [r.uid], [])
            if r.done:  # its forwards could not be counted: ended with that error
                return
            record, mass = record and record[made:], mass and mass[made:]
        # mlx-lm's order: a length cut, unless the token is EOS.
        finish = "stop" if token in self._eos else "length" if r.generated + 1 >= r.max_tokens else None
        self._flight.on_token(r, SoloToken(token, logprobs, finish))
        GENERATED_TOKENS.inc()
        self._flight.finish_ends()
        if r.done and group.solo is solo:
            group.end_solo()
        self._tally(group, record, mass, [r.uid], [])

    def _fail(self, group: DecodeGroup, e: Exception) -> None:
        """Ends every request of ``group`` with the error a step raised."""
        log.warning("generation step failed", extra={"error": str(e)})
        err = errors.ours_or_internal(e, "generation failed")
        if group.solo is not None:
            group.end_solo()
        self._flight.fail(list(group.requests.values()), err)
        group.requests.clear()

    def _tally(
        self, group: DecodeGroup, record: list | None, mass: list | None, generated: list, started: list
    ) -> None:
        """Hands one step's recorded forwards to the group's tallies (``DecodeGroup.tally``) and
        ends the citing requests whose forwards could not be counted."""
        if record or mass:
            for r, error in group.tally(record, mass, generated, started):
                self._flight.end(r, error)
