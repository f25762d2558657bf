"""READY KV memories in RAM: exact cosine FAISS indexes plus the raw keys and values.

One ``IndexFlatIP`` per (memory, layer, KV head) over L2-normalised float32 keys (zero-norm rows
stay zero, so their cosine is 0, never NaN). The raw keys and values stay in RAM in the memory's
dtype (bfloat16 as its uint16 bits) for ``return_vectors`` and ``FetchMemory``. Redis is the
source of truth: ``rebuild`` loads every READY memory at start-up, and a memory that turns READY
(here or in another process) is loaded on first use.

A ``LoadedMemory`` never changes once built; searches hold references, so a concurrent delete only
drops the dict entry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass

import faiss
import numpy as np

from extmind.errors import FailedPrecondition
from extmind.tensor import BFLOAT16, STORAGE, bf16_bits_to_float32
from services.memory import kv_store
from services.memory.kv_layout import READY, Layout, MemoryMeta, meta_key
from services.memory.kv_store import KVStore
from services.memory.limits import FETCH_YIELD_SECONDS, SEARCH_THREADS

log = logging.getLogger("extmind.memory.index")


def _threads_env(name: str, default: int) -> int:
    """A thread count from environment variable ``name`` (unset or empty = ``default``). A value
    that is not a whole number stops the import with a ValueError naming the variable (the
    service then fails to start with that line, not a bare int() message); below 1 counts as 1."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        return max(1, int(raw))
    except ValueError:
        raise ValueError(f"{name}={raw!r} must be a whole number of threads (>= 1)") from None


# OpenMP thread counts are per thread. Small searches run on the event loop thread with one
# OpenMP thread (docs/platform.md: faster for small queries on 2 cores); large ones on the worker
# threads with every core (measured: 65 536 rows, q = 1: 29 ms vs 59 ms with one thread).
SMALL_THREADS = _threads_env("EXTMIND_FAISS_THREADS", 1)
LARGE_THREADS = _threads_env("EXTMIND_FAISS_LARGE_THREADS", os.cpu_count() or 1)
faiss.omp_set_num_threads(SMALL_THREADS)
# faiss picks its kernel with a global threshold. Measured here (1 thread, d = 128): the SIMD
# scan wins for a handful of queries per call (q = 1: 4 query heads per KV head), BLAS (sgemm)
# from ~16 queries on (q = 64: 3-6x faster). ``search_loaded`` sets it per call. Two searches
# racing on the global (an inline search and a worker's large one) can run the other kernel: the
# same rows ranked by the same cosines, but summed in another order, so the scores may differ in
# the last bit (measured: up to 2e-7) from a search run alone, and a near-tie or a cosine within
# that of ``sim_threshold`` can go either way. Not made per call: a lock would make the event
# loop's small searches wait for a large one (tens of ms).
BLAS_FROM_QUERIES = 16
_BLAS_ALWAYS, _BLAS_NEVER = 1, 1 << 30
# Searches up to this much work (rows x query heads x query tokens) run on the event loop thread:
# a thread hand-off costs more than the search. It takes in a decode step of 8 sequences of a
# 1 B model (32 query heads) over 4 096 rows, which REMOTE retrieval sends once per layer: in the
# service 1.7 ms inline with its heads split (below), 3.5 ms on a worker thread with 2 OpenMP
# threads (2 cores; bench/RESULTS.md, remote_round_trip).
INLINE_SEARCH_WORK = 1 << 20
# Those small searches split their KV heads over this many threads (the event loop's and
# HEAD_THREADS - 1 of a pool, one OpenMP thread each; FAISS releases the GIL): the 1 B model's
# 8 KV heads x 4 096 rows, q = 1 took 0.79 ms on one thread, 0.58 ms on two (2-core x86_64,
# in-process, cache-cold; bench/remote_round_trip.py). 1 = every head on the event loop thread.
HEAD_THREADS = _threads_env("EXTMIND_FAISS_HEAD_THREADS", min(os.cpu_count() or 1, 8))
# ... when they have at least this much work: handing heads to the pool's threads costs ~0.1 ms in
# the service (2 cores), what searching 2 048 rows for 32 query heads saves.
HEAD_SPLIT_WORK = 1 << 16


def to_float32(a: np.ndarray, dtype: int) -> np.ndarray:
    """Raw storage array -> float32 (bf16 bits widened exactly)."""
    if dtype == BFLOAT16:
        return bf16_bits_to_float32(a)
    return a.astype(np.float32, copy=False)


def normalize_rows(x: np.ndarray, *, inplace: bool = False) -> np.ndarray:
    """L2-normalised float32 rows (last axis); zero or non-finite norms give zero rows. A copy
    unless ``inplace`` (then ``x`` must be a C-contiguous float32 array this caller owns)."""
    if not (inplace and x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable):
        x = np.array(x, dtype=np.float32, copy=True, order="C")
    sq = np.einsum("...d,...d->...", x, x)
    bad = ~np.isfinite(sq)
    if bad.any():  # overflow in float32: redo those rows in float64
        sq = sq.astype(np.float64)
        sq[bad] = np.einsum("...d,...d->...", x[bad].astype(np.float64), x[bad].astype(np.float64))
    norms = np.sqrt(sq)
    ok = (norms > 0) & np.isfinite(norms)
    inv = np.zeros_like(norms, dtype=np.float32)
    np.divide(1.0, norms, out=inv, where=ok, casting="unsafe")
    x *= inv[..., None]
    x[~ok] = 0.0
    return x


@dataclass
class MemoryRows:
    """One READY memory's rows in RAM: what FetchMemory needs (no indexes)."""

    meta: MemoryMeta
    rows: int
    keys: list  # per layer: [num_kv_heads, rows, head_dim] raw (memory dtype)
    values: list

    @property
    def layout(self) -> Layout:
        return self.meta.layout


@dataclass
class LoadedMemory(MemoryRows):
    """One READY memory in RAM: its rows and their per-head search indexes."""

    indexes: list  # per layer: [faiss.IndexFlatIP] per KV head

    @staticmethod
    def build(meta: MemoryMeta, layers: list) -> LoadedMemory:
        """``layers``: per layer the (keys, values, indexes) of ``build_layer``."""
        rows = meta.rows[0] if meta.rows else 0
        return LoadedMemory(
            meta=meta,
            rows=rows,
            keys=[x[0] for x in layers],
            values=[x[1] for x in layers],
            indexes=[x[2] for x in layers],
        )


@dataclass
class _Load:
    """A load in progress: ``rows`` is set once the rows are in RAM, ``loaded`` once the indexes
    are built too."""

    rows: asyncio.Future
    loaded: asyncio.Future


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """Row batches [H, n_i, D] of one layer, in order -> [H, sum n_i, D] (no copy for one batch)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


def build_layer(meta: MemoryMeta, keys: np.ndarray, values: np.ndarray) -> tuple:
    """-> (keys, values, [IndexFlatIP per KV head]) of one layer."""
    f32 = to_float32(keys, meta.dtype)
    normed = normalize_rows(f32, inplace=f32 is not keys)
    per_head = []
    for h in range(meta.num_kv_heads):
        index = faiss.IndexFlatIP(meta.head_dim)
        index.add(normed[h])
        per_head.append(index)
    return keys, values, per_head


def search_loaded(
    memories: list[LoadedMemory],
    layer: int,
    queries: np.ndarray,
    top_k: int,
    sim_threshold: float | None = None,
    return_vectors: bool = False,
    heads_pool: concurrent.futures.Executor | None = None,
    head_groups: int = 1,
):
    """Exact cosine top-k of every query head and query token over one layer of ``memories``
    (their rows concatenated in order). ``queries`` float32 [H, q, D], H a multiple of the KV
    heads. -> (scores f32 [H,q,k], indices i64 [H,q,k], keys, values [H,q,k,D] or None).

    With ``heads_pool`` the KV heads are split into ``head_groups`` runs of consecutive heads:
    this thread searches the first, the pool's threads the others at the same time (FAISS
    releases the GIL). Every head's answer is the same either way."""
    first = memories[0].meta
    G, D = first.num_kv_heads, first.head_dim
    H, q, _ = queries.shape
    rep = H // G
    total = sum(b.rows for b in memories)
    k = min(top_k, total)
    qn = normalize_rows(queries).reshape(G, rep * q, D)
    faiss.cvar.distance_compute_blas_threshold = _BLAS_ALWAYS if rep * q >= BLAS_FROM_QUERIES else _BLAS_NEVER
    scores = np.empty((G, rep * q, k), np.float32)
    indices = np.empty((G, rep * q, k), np.int64)
    offsets = np.cumsum([0] + [b.rows for b in memories])

    def search_heads(heads: range) -> None:
        for g in heads:
            x = qn[g]
            if len(memories) == 1:
                scores[g], indices[g] = memories[0].indexes[layer][g].search(x, k)
                continue
            parts_s, parts_i = [], []
            for b, off in zip(memories, offsets):
                kb = min(k, b.rows)
                if kb == 0:
                    continue
                s_b, i_b = b.indexes[layer][g].search(x, kb)
                parts_s.append(s_b)
                parts_i.append(i_b + off)
            s, i = np.concatenate(parts_s, axis=1), np.concatenate(parts_i, axis=1)
            order = np.argsort(-s, axis=1, kind="stable")[:, :k]
            scores[g], indices[g] = np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)

    groups = min(head_groups, G) if heads_pool is not None else 1
    cuts = [G * j // groups for j in range(groups + 1)]
    others = [heads_pool.submit(search_heads, range(a, b)) for a, b in zip(cuts[1:-1], cuts[2:])]
    try:
        search_heads(range(cuts[0], cuts[1]))
    finally:
        for f in others:
            f.result()
    np.clip(scores, -1.0, 1.0, out=scores)
    if sim_threshold is not None:
        masked = scores <= np.float32(sim_threshold)
        scores[masked] = -np.inf
        indices[masked] = -1
    keys = values = None
    if return_vectors:
        keys, values = (x.reshape(H, q, k, D) for x in _gather(memories, offsets, layer, indices))
    return scores.reshape(H, q, k), indices.reshape(H, q, k), keys, values


def _gather(memories: list[LoadedMemory], offsets, layer: int, indices: np.ndarray) -> tuple:
    """The keys and values [G, n, k, D] of the rows ``indices`` [G, n, k] names in the KV head
    of its first axis (rows of ``memories`` concatenated; -1: none, zero vectors)."""
    heads = np.arange(indices.shape[0])[:, None, None]
    if len(memories) == 1 and indices.size and indices.min() >= 0:  # the common case: one fancy index
        b = memories[0]
        return b.keys[layer][heads, indices], b.values[layer][heads, indices]
    b = memories[0]
    shape = (*indices.shape, b.meta.head_dim)
    keys, values = np.zeros(shape, b.keys[layer].dtype), np.zeros(shape, b.values[layer].dtype)
    for b, off in zip(memories, offsets):
        g, n, j = np.nonzero((indices >= off) & (indices < off + b.rows))
        rows = indices[g, n, j] - off
        keys[g, n, j], values[g, n, j] = b.keys[layer][g, rows], b.values[layer][g, rows]
    return keys, values


class KVIndex:
    """The in-RAM side of the KV memories, kept in step with a ``KVStore``."""

    def __init__(self, store: KVStore, threads: int = SEARCH_THREADS):
        self.store = store
        self.sync = store.sync
        self.loaded: dict[str, LoadedMemory] = {}  # memory id -> its READY rows in RAM
        self._loading: dict[str, _Load] = {}
        self._gen: dict[str, int] = {}
        self.pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, threads),
            thread_name_prefix="kv",
            initializer=faiss.omp_set_num_threads,
            initargs=(LARGE_THREADS,),
        )
        self.inline_search = threads == 0  # 0 = search on the event loop thread
        self.head_groups = max(1, HEAD_THREADS)
        self.heads = (
            concurrent.futures.ThreadPoolExecutor(
                max_workers=self.head_groups - 1,
                thread_name_prefix="kv-heads",
                initializer=faiss.omp_set_num_threads,
                initargs=(SMALL_THREADS,),
            )
            if self.head_groups > 1
            else None
        )
        # Loads into RAM on threads of their own: a load that waits for fetches of its memory
        # (``_yield_to_fetches``) must not hold a thread that searches wait for.
        self.loader = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, threads),
            thread_name_prefix="kv-load",
            initializer=faiss.omp_set_num_threads,
            initargs=(LARGE_THREADS,),
        )
        self._fetching: dict[str, int] = {}  # memory id -> FetchMemory streams sending its rows now
        self._fetches_done = threading.Condition()

    def close(self) -> None:
        """Waits for running loads and searches; drops queued ones."""
        self.loader.shutdown(wait=True, cancel_futures=True)
        self.pool.shutdown(wait=True, cancel_futures=True)
        if self.heads is not None:
            self.heads.shutdown(wait=True)

    # ---------------------------------------------------------------- loading

    def _load_layer(self, meta: MemoryMeta, layer: int) -> tuple:
        with kv_store.redis_errors():
            keys, values = kv_store.read_layer(self.sync, meta, STORAGE[meta.dtype], layer)
        return build_layer(meta, keys, values)

    def load(self, meta: MemoryMeta, appended: list | None = None, on_rows=None) -> LoadedMemory:
        """A READY memory into RAM (blocking; any thread): its rows, then its indexes. The rows
        come from ``appended`` when given (per layer, the [H, n, D] batches of the append stream
        that wrote every row, in order: they are what Redis holds), else from Redis.
        ``on_rows(MemoryRows)`` is called as soon as the rows are in RAM, before the indexes are
        built (FetchMemory needs no index). Raises FailedPrecondition when the memory was deleted
        (or created again) while its rows were read from Redis."""
        t0 = time.perf_counter()
        if appended is None:
            with kv_store.redis_errors():
                storage = STORAGE[meta.dtype]
                layers = [kv_store.read_layer(self.sync, meta, storage, x) for x in range(meta.num_layers)]
                now = self.sync.hget(meta_key(meta.memory_id), "create_us")
            if now is None or int(now) != meta.create_us:  # deleted (and created again) while read
                raise FailedPrecondition(f"memory {meta.memory_id!r} was deleted while it loaded; retry")
        else:
            layers = [(_joined([k for k, _ in parts]), _joined([v for _, v in parts])) for parts in appended]
        rows = MemoryRows(meta, meta.rows[0] if meta.rows else 0, [k for k, _ in layers], [v for _, v in layers])
        t1 = time.perf_counter()
        if on_rows is not None:
            on_rows(rows)
        built, paused = [], 0.0
        for k, v in layers:
            paused += self._yield_to_fetches(meta.memory_id, t1 + FETCH_YIELD_SECONDS)
            built.append(build_layer(meta, k, v))
        loaded = LoadedMemory.build(meta, built)
        log.info(
            "memory loaded",
            extra={
                "memory_id": meta.memory_id,
                "source": "redis" if appended is None else "append stream",
                "seconds": round(time.perf_counter() - t0, 3),
                "read_seconds": round(t1 - t0, 3),
                "index_seconds": round(time.perf_counter() - t1 - paused, 3),
                "paused_for_fetch_seconds": round(paused, 3),
            },
        )
        return loaded

    @contextlib.contextmanager
    def fetching(self, memory_id: str):
        """Marks a FetchMemory stream sending ``memory_id``'s rows while inside: a load of that
        memory pauses its index build meanwhile (``_yield_to_fetches``)."""
        with self._fetches_done:
            self._fetching[memory_id] = self._fetching.get(memory_id, 0) + 1
        try:
            yield
        finally:
            with self._fetches_done:
                left = self._fetching.pop(memory_id) - 1
                if left:
                    self._fetching[memory_id] = left
                else:
                    self._fetches_done.notify_all()

    def _yield_to_fetches(self, memory_id: str, until: float) -> float:
        """Waits while a FetchMemory stream sends ``memory_id``'s rows, until ``until``
        (perf_counter) at the latest. The generator that just memorized the memory is waiting
        for those rows, while only searches need the index: on few cores, building it at the
        same time slowed the fetch by more than the build takes. -> seconds waited."""
        t0 = time.perf_counter()
        with self._fetches_done:
            self._fetches_done.wait_for(
                lambda: memory_id not in self._fetching, timeout=max(0.0, until - time.perf_counter())
            )
        return time.perf_counter() - t0

    def rebuild(self) -> dict:
        """Start-up: every READY memory from Redis into RAM (blocking). -> stats."""
        t0 = time.perf_counter()
        metas = kv_store.scan_memories(self.sync)
        ready = [m for m in metas if m.state == READY]
        rows = 0
        # Layers load on two threads: one reads from Redis (socket I/O and copies release the
        # GIL) while the other converts, normalises and adds.
        with concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="rebuild") as pool:
            jobs = [(m, [pool.submit(self._load_layer, m, layer) for layer in range(m.num_layers)]) for m in ready]
            failed = 0
            for m, futs in jobs:
                try:
                    loaded = LoadedMemory.build(m, [f.result() for f in futs])
                except Exception:  # noqa: BLE001 - one damaged memory must not keep the rest offline
                    failed += 1
                    log.exception(
                        "could not load a READY memory; it stays in Redis and is retried on use",
                        extra={"memory_id": m.memory_id},
                    )
                    continue
                self.loaded[m.memory_id] = loaded
                rows += loaded.rows * m.num_layers * m.num_kv_heads
        stats = {
            "memories": len(metas),
            "ready": len(ready),
            "failed": failed,
            "rows": rows,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        log.info("indexes rebuilt from redis", extra=stats)
        return stats

    async def get(self, memory_id: str) -> LoadedMemory:
        """The READY memory in RAM: from RAM, else loaded from Redis once (NOT_FOUND /
        FAILED_PRECONDITION when it is missing or not READY)."""
        found = self.loaded.get(memory_id)
        if found is not None:
            return found
        job = await self._load_of(memory_id)
        return job if isinstance(job, LoadedMemory) else await asyncio.shield(job.loaded)

    async def rows(self, memory_id: str) -> MemoryRows:
        """The READY memory's rows in RAM, as ``get`` but without waiting for a load in progress
        to build its indexes (FetchMemory right after a Memorize)."""
        found = self.loaded.get(memory_id)
        if found is not None:
            return found
        job = await self._load_of(memory_id)
        return job if isinstance(job, LoadedMemory) else await asyncio.shield(job.rows)

    async def _load_of(self, memory_id: str) -> LoadedMemory | _Load:
        """The memory in RAM or its load in progress, started if none is (after checking the
        memory exists and is READY)."""
        while True:
            job = self._loading.get(memory_id)
            if job is not None:
                return job
            gen = self._gen.get(memory_id, 0)
            meta = await self.store.get(memory_id)
            # Deleted or created again while its meta was read (``drop``): that meta may describe
            # a memory that is gone, whose id now holds other rows; read it again.
            if self._gen.get(memory_id, 0) == gen:
                break
        if meta.state != READY:
            raise FailedPrecondition(
                f"memory {memory_id!r} is {meta.state}, not READY: every layer needs "
                f"{meta.expected if meta.expected >= 0 else 'the same number of'} rows "
                f"(now {meta.rows}); finish appending first"
            )
        return self.loaded.get(memory_id) or self._loading.get(memory_id) or self._start_load(meta)

    def _start_load(self, meta: MemoryMeta, appended: list | None = None) -> _Load:
        loop = asyncio.get_running_loop()
        mid = meta.memory_id
        gen = self._gen.get(mid, 0)
        rows = loop.create_future()
        rows.add_done_callback(lambda f: f.cancelled() or f.exception())  # waiters get it; none may wait

        def settle(value: MemoryRows | BaseException) -> None:
            if not rows.done():
                (rows.set_exception if isinstance(value, BaseException) else rows.set_result)(value)

        fut = loop.run_in_executor(
            self.loader, self.load, meta, appended, lambda r: loop.call_soon_threadsafe(settle, r)
        )
        job = self._loading[mid] = _Load(rows, fut)

        def done(f: asyncio.Future) -> None:
            if self._loading.get(mid) is job:
                del self._loading[mid]
            if f.cancelled():
                rows.cancel()
                return
            if f.exception() is not None:
                settle(f.exception())
                log.error("loading a memory failed", extra={"memory_id": mid}, exc_info=f.exception())
                return
            if self._gen.get(mid, 0) == gen:  # not deleted meanwhile
                self.loaded[mid] = f.result()

        fut.add_done_callback(done)
        return job

    def preload(self, meta: MemoryMeta, appended: list | None = None) -> None:
        """A memory just turned READY: loads it into RAM in the background (from ``appended``,
        see ``load``, when given)."""
        if meta.memory_id not in self.loaded and meta.memory_id not in self._loading:
            job = self._start_load(meta, appended)
            job.loaded.add_done_callback(lambda f: f.cancelled() or f.exception())  # consumed by ``done``

    def drop(self, memory_id: str) -> None:
        self._gen[memory_id] = self._gen.get(memory_id, 0) + 1
        self.loaded.pop(memory_id, None)
        self._loading.pop(memory_id, None)

    # ---------------------------------------------------------------- search

    @staticmethod
    def _work(memories: list[LoadedMemory], queries: np.ndarray) -> int:
        return sum(m.rows for m in memories) * queries.shape[0] * queries.shape[1]

    def _inline(self, memories: list[LoadedMemory], queries: np.ndarray) -> bool:
        return self.inline_search or self._work(memories, queries) <= INLINE_SEARCH_WORK

    def _search_inline(self, memories, layer, queries, top_k, sim_threshold, return_vectors):
        pool = self.heads if self._work(memories, queries) >= HEAD_SPLIT_WORK else None
        return search_loaded(memories, layer, queries, top_k, sim_threshold, return_vectors, pool, self.head_groups)

    async def search(
        self,
        memories: list[LoadedMemory],
        layer: int,
        queries: np.ndarray,
        top_k: int,
        sim_threshold: float | None,
        return_vectors: bool,
    ):
        """``search_loaded``: small searches inline on the event loop thread (their KV heads split
        over ``heads``), large ones on a worker thread."""
        if self._inline(memories, queries):
            return self._search_inline(memories, layer, queries, top_k, sim_threshold, return_vectors)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.pool, search_loaded, memories, layer, queries, top_k, sim_threshold, return_vectors
        )

    def search_blocking(
        self,
        memories: list[LoadedMemory],
        layer: int,
        queries: np.ndarray,
        top_k: int,
        sim_threshold: float | None = None,
        return_vectors: bool = False,
    ):
        """``search`` for callers without an event loop (in-process use, the benchmark); call it
        from the thread that imported this module, as the service's event loop does."""
        if self._inline(memories, queries):
            return self._search_inline(memories, layer, queries, top_k, sim_threshold, return_vectors)
        return self.pool.submit(search_loaded, memories, layer, queries, top_k, sim_threshold, return_vectors).result()
