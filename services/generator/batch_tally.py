"""A decode batch's per-request tallies (citation counts, attention mass), added up for the batch.

Every decode forward of a group with memories records per retrieving layer an array (or
``citations.Picks``) whose first axis is the batch. Handing each batch row to its request at every
step costs a few small ops per request, layer and step; on a GPU, where a step is a few
milliseconds, that grew with the batch and took most of the step (1 B shape on an H200, 8 streams
with a memory: 5.3 ms per step without the tallies, 8.7-10.1 ms with; docs/architecture.md
"Tallies of a decode batch"). So a group keeps the forwards recorded for its current batch (the
same sequences in the same rows) and hands them out in one graph: a few ops per flush for the
whole batch, plus one per request that keeps the tally.

It flushes when the batch changes (a sequence joins or leaves: the rows would mean other
requests), every FLUSH_STEPS forwards (a short graph), once the pending arrays hold FLUSH_ITEMS
elements (they keep their forwards' whole-batch arrays alive: a large top-k would hold gigabytes),
and before a request reads its tally (``flush``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import mlx.core as mx


class BatchTally:
    """The forwards one group recorded for its current decode batch, not yet handed out.

    attr: the request attribute that takes a batch row ("counts" or "mass": an object with
    ``add_row(row, steps)``, or None when the request keeps no such tally); lookup: uid -> the
    request or None (it left); combine: the pending forwards (each a list of per-layer records
    of [B, ...]) -> one array [B, ...] whose row b is request b's share of them; compact: a
    forward's per-layer records -> the records kept for it (its layers stacked into one, so a
    flush combines one record per forward, not one per layer; None = the records as given)."""

    FLUSH_STEPS = 32
    FLUSH_ITEMS = 1 << 23  # elements of the whole batch's pending records (picks, shares)

    def __init__(
        self,
        attr: str,
        lookup: Callable,
        combine: Callable[[list[list]], mx.array],
        compact: Callable[[list], list] | None = None,
    ):
        self.attr = attr
        self.lookup = lookup
        self.combine = combine
        self.compact = compact
        self._uids: tuple[int, ...] | None = None
        self._pending: list[list] = []
        self._items = 0

    def add(self, uids: Sequence[int], records: list, compact: bool = True) -> list:
        """One decode forward's per-layer records [B, ...]; uids: the sequence in each batch row;
        compact: whether to compact them now (records that are graphs, evaluated with the step:
        compacted, one array to evaluate; records the step's kernels wrote keep their layers until
        the flush combines them, so a step launches nothing for them). Returns what is kept for
        the forward (the records, or ``compact(records)``)."""
        uids = tuple(uids)
        if uids != self._uids:
            self.flush()
            self._uids = uids
        kept = self.compact(records) if self.compact is not None and compact else records
        self._pending.append(kept)
        self._items += sum(r.size for r in records)
        if len(self._pending) >= self.FLUSH_STEPS or self._items >= self.FLUSH_ITEMS:
            self.flush()
        return kept

    def drop(self) -> None:
        """Forgets the pending forwards unhanded (their requests ended: a flush that failed)."""
        self._pending, self._items, self._uids = [], 0, None

    def flush(self) -> None:
        """Hands every pending forward's rows to the requests that keep this tally."""
        pending = self._pending
        if not pending:
            return
        takers = []
        for b, uid in enumerate(self._uids):
            acc = getattr(self.lookup(uid), self.attr, None)
            if acc is not None:
                takers.append((b, acc))
        # Combined before the records are let go: should it raise, they stay, and every request
        # that reads this tally fails too rather than counting without them.
        batch = self.combine(pending) if takers else None
        self._pending, self._items = [], 0
        for b, acc in takers:
            acc.add_row(batch[b], len(pending))
        if takers:
            mx.async_eval([acc.total for _, acc in takers])  # keeps each tally a short graph
