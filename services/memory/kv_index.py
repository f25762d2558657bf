"""READY KV memories in RAM: which are loaded, their loading from Redis, and where each search
runs (the search itself, FAISS indexes over the keys, is services/memory/kv_search.py). Redis is
the source of truth: ``rebuild`` loads every READY memory at start-up, and a memory that turns READY
(here or in another process) is loaded on first use.

A ``LoadedMemory`` never changes once built; searches hold references, so a concurrent delete only
drops the dict entry.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import threading
import time
from dataclasses import dataclass

import faiss
import numpy as np

from extmind.errors import FailedPrecondition
from extmind.tensor import STORAGE
from services.common.background import retrieved
from services.memory import kv_store
from services.memory.kv_layout import READY, MemoryMeta, meta_key
from services.memory.kv_search import (
    HEAD_SPLIT_WORK,
    HEAD_THREADS,
    INLINE_SEARCH_WORK,
    LARGE_THREADS,
    SMALL_THREADS,
    LoadedMemory,
    MemoryRows,
    build_layer,
    search_loaded,
)
from services.memory.kv_store import KVStore
from services.memory.limits import FETCH_YIELD_SECONDS, SEARCH_THREADS

log = logging.getLogger("extmind.memory.index")


@dataclass
class _Load:
    """A load in progress: ``rows`` is set once the rows are in RAM, ``loaded`` once the indexes
    are built too."""

    rows: asyncio.Future
    loaded: asyncio.Future


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """Row batches [H, n_i, D] of one layer, in order -> [H, sum n_i, D] (no copy for one batch)."""
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)


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
            damaged = None
            with kv_store.redis_errors():
                storage = STORAGE[meta.dtype]
                try:
                    layers = [kv_store.read_layer(self.sync, meta, storage, x) for x in range(meta.num_layers)]
                except RuntimeError as e:  # a chunk gone: deleted meanwhile (checked next) or damaged
                    damaged = e
                now = self.sync.hget(meta_key(meta.memory_id), "create_us")
            if now is None or int(now) != meta.create_us:  # deleted (and created again) while read
                raise FailedPrecondition(f"memory {meta.memory_id!r} was deleted while it loaded; retry")
            if damaged is not None:  # the memory is still there: its rows really are damaged
                raise damaged
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
        rows.add_done_callback(retrieved)  # waiters get it; none may wait

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
                if isinstance(f.exception(), FailedPrecondition):  # deleted while it loaded: the callers' error
                    log.info("a memory was deleted while it loaded", extra={"memory_id": mid})
                else:
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
            job.loaded.add_done_callback(retrieved)  # consumed by ``done``

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
