"""Dynamic batching: concurrent requests share model forwards on the one MLX thread.

Requests put their sequences (token-id lists) in a bounded queue; one asyncio task packs
pending sequences of the same model into a batch -- the oldest waiting sequence plus its
nearest neighbours by length (less padding), within a padded-token budget, a size cap and a
limit on the padding each added sequence brings --
and runs it on the MLX thread. While a batch runs, new requests pile up and ride the next one.
Sequences of cancelled or expired requests are dropped before they cost model time.
The queue depth, batch sizes and tokens embedded are Prometheus metrics, per model
(docs/architecture.md, "Metrics").
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
from dataclasses import dataclass

import numpy as np
from prometheus_client import Counter, Gauge, Histogram

from extmind.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted, Unavailable
from services.common.mlx_thread import MLXThread

log = logging.getLogger("extmind.embedder.batcher")

QUEUED = Gauge("extmind_embedder_queued_sequences", "texts waiting for a forward, by model", ["model"])
BATCH_SIZE = Histogram(
    "extmind_embedder_batch_size",
    "texts per forward, by model",
    ["model"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
TOKENS = Counter("extmind_embedder_tokens", "tokens embedded (padding excluded), by model", ["model"])


@dataclass
class Limits:
    max_batch_tokens: int = 16384  # padded tokens in one forward
    max_batch_size: int = 64  # sequences in one forward
    max_queue: int = 2048  # sequences waiting, all requests together
    max_inputs_per_request: int = 512
    # Most padding tokens one sequence may add to a batch (-1 = no limit). On a CPU a forward is
    # compute-bound, so padding costs as much as real tokens: past a few tokens of padding a
    # separate forward is cheaper than a wider batch.
    max_added_padding: int = 16


class _PendingCall:
    def __init__(self, model, n: int, deadline: float | None):
        self.model = model
        self.rows: list[np.ndarray | None] = [None] * n
        self.left = n
        self.deadline = deadline
        self.future: asyncio.Future = asyncio.get_running_loop().create_future()

    @property
    def dead(self) -> bool:
        return self.future.done()  # answered, failed or cancelled

    def put(self, index: int, row: np.ndarray) -> None:
        self.rows[index] = row
        self.left -= 1
        if self.left == 0 and not self.future.done():
            self.future.set_result(np.stack(self.rows))

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


@dataclass
class _Seq:
    order: int  # arrival order: the oldest sequence always rides the next batch
    ids: list[int]
    request: _PendingCall
    index: int


class QueueFull(ResourceExhausted):
    """The queue has no room for a request now (retryable; ``Batcher.wait_for_room``)."""


class Batcher:
    def __init__(self, mlx: MLXThread, limits: Limits):
        self.mlx = mlx
        self.limits = limits
        self._pending: list[_Seq] = []
        self._counter = itertools.count()
        self._wake = asyncio.Event()
        self._freed = asyncio.Event()  # set whenever sequences leave the queue
        self._task: asyncio.Task | None = None
        self.batches_run = 0  # for tests and logs: how many forwards ran
        self.sequences_run = 0
        self._queued_models: set[str] = set()  # every model the queue gauge has a value for

    @property
    def queued(self) -> int:
        return len(self._pending)

    async def wait_for_room(self, n: int) -> None:
        """Returns once ``n`` more sequences fit the queue (another caller may still take the room
        first: ``run`` then raises QueueFull again)."""
        while self.queued + n > self.limits.max_queue:
            self._freed.clear()
            await self._freed.wait()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="embedder-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for s in self._pending:
            s.request.fail(Unavailable("the embedder is shutting down; retry on another instance"))
        self._pending.clear()
        self._publish_queue()

    def _publish_queue(self) -> None:
        """Sets the queue-depth gauge of every model (0 for a model with nothing waiting); the
        queue changed, so waiters for room look again."""
        self._freed.set()
        counts = collections.Counter(s.request.model.name for s in self._pending)
        self._queued_models |= counts.keys()
        for name in self._queued_models:
            QUEUED.labels(name).set(counts.get(name, 0))

    async def run(self, model, seqs: list[list[int]], deadline: float | None = None) -> np.ndarray:
        """Queues ``seqs`` for ``model`` and waits for their rows (in order). ``deadline`` is an
        event-loop time after which the request is dropped unrun."""
        if self._task is None or self._task.done():
            raise Unavailable("the embedder's batcher is not running (starting up or shutting down)")
        if len(seqs) > self.limits.max_queue:  # would never fit, however long the caller waits: not retryable
            raise InvalidArgument(
                f"{len(seqs)} texts in one request; the queue takes at most {self.limits.max_queue} "
                "(--max-queue): send fewer texts at once"
            )
        if self.queued + len(seqs) > self.limits.max_queue:
            raise QueueFull(
                f"the queue holds {self.queued} texts and takes at most {self.limits.max_queue}; "
                "retry shortly or send fewer texts at once"
            )
        req = _PendingCall(model, len(seqs), deadline)
        self._pending.extend(_Seq(next(self._counter), ids, req, i) for i, ids in enumerate(seqs))
        self._publish_queue()
        self._wake.set()
        try:
            return await req.future
        except asyncio.CancelledError:
            req.future.cancel()  # marks its queued sequences dead; the packer drops them
            raise

    def _drop_dead(self) -> None:
        now = asyncio.get_running_loop().time()
        keep = []
        for s in self._pending:
            r = s.request
            if not r.dead and r.deadline is not None and now >= r.deadline:
                r.fail(
                    DeadlineExceeded(
                        "the request's deadline passed while it waited in the queue; "
                        "raise the deadline or retry when the service is less busy"
                    )
                )
            if not r.dead:
                keep.append(s)
        self._pending = keep

    def _take(self) -> list[_Seq]:
        """The next batch: the oldest sequence plus same-model neighbours closest in length."""
        self._drop_dead()
        if not self._pending:
            self._publish_queue()
            return []
        oldest = self._pending[0]
        same = sorted(
            (s for s in self._pending if s.request.model is oldest.request.model), key=lambda s: (len(s.ids), s.order)
        )
        pos = same.index(oldest)
        lo = hi = pos
        width = len(oldest.ids)
        size = 1
        lim = self.limits
        while size < lim.max_batch_size:
            options = []
            if lo > 0:
                options.append((len(oldest.ids) - len(same[lo - 1].ids), -1))
            if hi < len(same) - 1:
                options.append((len(same[hi + 1].ids) - len(oldest.ids), +1))
            grown = False
            for _, side in sorted(options):
                cand = same[lo - 1] if side < 0 else same[hi + 1]
                new_width = max(width, len(cand.ids))
                added_padding = new_width * (size + 1) - width * size - len(cand.ids)
                if new_width * (size + 1) <= lim.max_batch_tokens and (
                    lim.max_added_padding < 0 or added_padding <= lim.max_added_padding
                ):
                    width = max(width, len(cand.ids))
                    lo, hi = (lo - 1, hi) if side < 0 else (lo, hi + 1)
                    size += 1
                    grown = True
                    break
            if not grown:
                break
        batch = same[lo : hi + 1]
        taken = {id(s) for s in batch}
        self._pending = [s for s in self._pending if id(s) not in taken]
        self._publish_queue()
        return batch

    async def _loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while batch := self._take():
                model = batch[0].request.model
                try:
                    out = await self.mlx.run(model.forward, [s.ids for s in batch])
                except asyncio.CancelledError:
                    for s in batch:
                        s.request.fail(Unavailable("the embedder is shutting down; retry"))
                    raise
                except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the loop
                    log.exception("batch failed", extra={"model": model.name, "size": len(batch)})
                    for s in batch:
                        s.request.fail(exc)
                    continue
                self.batches_run += 1
                self.sequences_run += len(batch)
                BATCH_SIZE.labels(model.name).observe(len(batch))
                TOKENS.labels(model.name).inc(sum(len(s.ids) for s in batch))
                for row, s in zip(out, batch):
                    if not s.request.dead:
                        s.request.put(s.index, row)
