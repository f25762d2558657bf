"""A group of the scheduler: the requests that attend to the same memories with the same settings.

Each group is one mlx-lm ``BatchGenerator`` (services/generator/scheduler.py steps it), plus what
the group keeps between steps: the memory context its forwards read, the solo sequence (solo.py),
the per-request tallies of its decode batch (batch_tally.py) and the decode batch's unpadded caches.
"""

from __future__ import annotations

import functools
import logging

import mlx.core as mx
from mlx_lm.generate import BatchGenerator
from mlx_lm.models.cache import BatchKVCache

from extmind import errors
from services.generator import attention_mass, batch_cache
from services.generator.batch_tally import BatchTally
from services.generator.citations import Picks, decode_forwards, picked_rows, stack_picks
from services.generator.extended_attention import MemoryContext
from services.generator.solo import Solo

log = logging.getLogger("extmind.generator")


class DecodeGroup:
    """One group of requests that attend to the same memories with the same settings (or to
    none): its BatchGenerator, its memory context, its requests by uid, the sequence it steps
    solo (solo.py) and its per-request tallies (batch_tally.py)."""

    def __init__(
        self,
        key,
        gen: BatchGenerator,
        ctx: MemoryContext | None,
        num_layers: int,
        host_padded: bool = False,
        mass_every: int = 1,
    ):
        self.key = key
        self.gen = gen
        self.ctx = ctx
        # Sequences go into the BatchGenerator with batch_cache's caches (padding known on the
        # host): for models whose caches are plain KVCaches.
        self.host_padded = host_padded
        self.num_layers = num_layers
        self.requests: dict = {}  # uid -> running_request.RunningRequest
        # Layers that retrieve: each forward records that many index (and mass) arrays.
        self.layers = [i for i in range(num_layers) if ctx.applies(i)] if ctx is not None else []
        self.layers_per_forward = len(self.layers)
        # The decode batch's caches when none of its sequences is left-padded (see
        # ExtendedMindState.unpadded_caches), found again whenever the batch changes.
        self.unpadded_caches: dict = {}
        self.batch_changed = True
        # The one sequence decoding alone, out of the BatchGenerator (solo.py), and the uids put
        # back into it whose first forward repeats one already counted.
        self.solo: Solo | None = None
        self.resumed: set[int] = set()
        self.alone_steps = 0  # batch steps its one request has decoded alone in a row
        # Citation counts and attention mass of the decode batch, handed to its requests every
        # few steps for the whole batch at once (batch_tally.py).
        self.counts = self.mass = None
        # The attention mass is measured on one decode step in mass_every (0: never), counted from
        # the step after the group's requests changed (attention_mass.py, "Sampled steps").
        self.mass_every = mass_every
        self._mass_members: tuple = ()
        self._mass_phase = 0
        if ctx is not None:
            floor = ctx.cite_min_weight
            self.counts = BatchTally(
                "counts", self.requests.get, functools.partial(picked_rows, min_weight=floor), stack_picks
            )
            if mass_every > 0:
                self.mass = BatchTally(
                    "mass", self.requests.get, attention_mass.summed_shares, attention_mass.stack_shares
                )

    def remove(self, uid: int) -> None:
        """Takes sequence ``uid`` out of the BatchGenerator or ends it solo (the decode batch changes)."""
        if self.solo is not None and self.solo.request.uid == uid:
            self.end_solo()
        else:
            self.gen.remove([uid])
        self.resumed.discard(uid)
        self.batch_changed = True

    def new_cache(self) -> list | None:
        """A prompt's cache for ``BatchGenerator.insert(caches=[...])`` (None: mlx-lm makes one)."""
        return batch_cache.prompt_cache(self.num_layers) if self.host_padded else None

    def end_solo(self) -> None:
        self.solo.close()
        self.solo = None

    def recording(self) -> tuple[list | None, list | None]:
        """Points the group's memory context at fresh records for one step. -> (citations record,
        attention-mass record), each None when not recorded."""
        if self.ctx is None:
            return None, None
        # Record retrievals only while someone in the group wants citations (only memories cite).
        record = [] if any(r.counts is not None for r in self.requests.values()) else None
        if record is None:
            # The last citing request left: nothing is recorded any more, so no batch change
            # would flush what its tally still holds (whole-batch picks, up to FLUSH_ITEMS)
            # while the group serves others. No request takes it: flush() only drops it.
            self.counts.flush()
        mass = [] if self.layers and self.mass is not None and self._mass_due() else None
        self.ctx.record, self.ctx.mass = record, mass
        self.ctx.records_lazy = False
        return record, mass

    def _mass_due(self) -> bool:
        """Whether this step measures the attention mass: the first step after the group's
        requests changed (so a request that joins is measured early, even a short one), then
        every ``mass_every``-th."""
        members = tuple(self.requests)
        if members != self._mass_members:
            self._mass_members, self._mass_phase = members, 0
        due = self._mass_phase == 0
        self._mass_phase = (self._mass_phase + 1) % self.mass_every
        return due

    def alone(self):
        """-> the group's request when it is the only one and decoding (so nothing of the group is
        queued or prefilling), else None. A sequence just put back from solo is not decoding again
        until its first batch forward ran (``resumed``)."""
        if len(self.requests) != 1:
            return None
        (r,) = self.requests.values()
        return r if r.generated and not r.done and r.uid not in self.resumed else None

    def resume(self) -> None:
        """Puts the group's solo sequence back into its BatchGenerator (another request joins): its
        cache without the last token, whose forward the BatchGenerator runs first (again, unless
        the solo's first token was its last: solo.py), and its history for the logits
        processors. The sequence gets a new uid. Raises what flushing its tallies raises, the
        sequence still solo."""
        solo = self.solo
        r = solo.request
        for tally in (self.counts, self.mass):
            if tally is not None:
                # Its pending forwards are r's under the uid r leaves. First: should this raise
                # (the tally keeps them), r is still solo and the caller can end it.
                tally.flush()
        self.solo = None
        if solo.started:
            ahead = solo.ahead  # its last token's forward ran (and was counted): the batch runs it again
            cache, tokens = solo.end()
            (uid,) = self.gen.insert(
                [tokens[-1:]],
                max_tokens=[r.max_tokens - r.generated],
                caches=[batch_cache.host_padded(cache) if self.host_padded else cache],
                all_tokens=[tokens[:-1]],
                samplers=[r.sampler],
                logits_processors=[r.processors],
            )
            if ahead:
                self.resumed.add(uid)
        else:  # started solo from its prompt and joined before its first step: a prompt like any
            # (the prompt chunks it may have prefilled are dropped: joined within its prefill)
            solo.close()
            (uid,) = self.gen.insert(
                [solo.tokens],
                max_tokens=[r.max_tokens],
                caches=[self.new_cache()],
                samplers=[r.sampler],
                logits_processors=[r.processors],
            )
        del self.requests[r.uid]
        r.uid = uid
        self.requests[uid] = r
        self.batch_changed = True

    def tally(self, record: list | None, mass: list | None, generated: list, started: list) -> list:
        """Hands one step's recorded forwards (``recording``'s lists after the step) to the
        tallies; ``generated``: the uids of the step's tokens, ``started``: those whose prompt
        ended. Called after the step's tokens: a request that just ended does not count the
        forward on its last token (computed ahead, its output never used). -> (request, error) for
        each citing request taken out because its forwards could not be counted (never counted
        approximately); attention mass that cannot be measured stops being measured."""
        failed, recorded = [], []
        lazy = self.ctx.records_lazy
        if record:
            try:
                # A flush the add makes may raise too (its graph failed): the pending counts stay
                # short for good, so the citing requests end, and the rest of the group goes on.
                forwards = decode_forwards(record, self.layers_per_forward, generated, started)
                recorded += hand_out(self.counts, forwards, lazy)
            except Exception as e:  # noqa: BLE001
                log.error("citation counting failed", extra={"error": str(e)})
                self.counts.drop()
                err = errors.ours_or_internal(e, "citation counting failed")
                for r in [r for r in self.requests.values() if r.counts is not None]:
                    self.remove(r.uid)
                    failed.append((r, err))
        if mass:
            try:
                forwards = attention_mass.forward_shares(mass, self.layers_per_forward, generated, started)
                recorded += hand_out(self.mass, forwards, lazy)
            except Exception as e:  # noqa: BLE001 - a metric never fails a request
                self.stop_measuring_mass(e)
        if recorded and lazy:
            # The recorded rows and shares are tiny: evaluating them with the step frees the
            # forward's arrays they hang on; the requests add them up every few steps.
            mx.async_eval(recorded)
        return failed

    def stop_measuring_mass(self, error: Exception) -> None:
        """After a failed flush or read of the attention mass: the group's pending shares are
        dropped (they would fail every later flush) and none of its requests measures any more (a
        metric never fails a request)."""
        log.warning("attention mass not measured", extra={"error": str(error)})
        self.mass.drop()
        for r in self.requests.values():
            r.mass = None

    def close(self) -> None:
        """Ends the group: its BatchGenerator and, for REMOTE, its search stream (now, rather than
        whenever the retriever is garbage-collected: the memory service holds the stream open)."""
        if self.solo is not None:
            self.end_solo()
        self.gen.close()
        close = getattr(self.ctx.retriever, "close", None) if self.ctx is not None else None
        if close is not None:
            close()


def hand_out(tally: BatchTally, forwards: list, compact: bool) -> list:
    """Adds every decode forward's per-layer records to the group's ``tally`` (compacted when
    ``compact``: ``BatchTally.add``). -> the arrays it keeps when compacted (graphs, to evaluate
    with the step: a forward's layers stacked into one record), else []."""
    out = []
    for uids, records in forwards:
        kept = tally.add(uids, records, compact)
        if compact:  # else the step's kernels wrote them: nothing to evaluate
            out += [x for a in kept for x in (a.arrays() if isinstance(a, Picks) else [a])]
    return out


def unpadded_caches(gen: BatchGenerator) -> dict:
    """id -> cache of the decode batch's per-layer KV caches when no sequence in it is
    left-padded, else {} (also for cache types other than mlx-lm's BatchKVCache and
    batch_cache's). Called only when the batch changed (a sequence joined or left); reads the
    padding from the device only for mlx-lm's own class."""
    caches = getattr(getattr(gen, "_generation_batch", None), "prompt_cache", None) or []
    if not caches or any(type(c) not in (BatchKVCache, batch_cache.HostPaddedBatchKVCache) for c in caches):
        return {}
    if all(type(c) is batch_cache.HostPaddedBatchKVCache for c in caches):
        padded = any(max(c.host_padding) for c in caches)
    else:
        padded = mx.max(mx.concatenate([c.left_padding for c in caches])).item() != 0
    return {} if padded else {id(c): c for c in caches}
