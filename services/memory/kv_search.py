"""Exact cosine search of READY KV memories in RAM (FAISS), for services/memory/kv_index.py.

One ``IndexFlatIP`` per (memory, layer, KV head) over L2-normalised float32 keys (zero-norm rows
stay zero, so their cosine is 0, never NaN); the raw keys and values stay in the memory's dtype
(bfloat16 as its uint16 bits) for ``return_vectors`` and ``FetchMemory``. Also the thread
settings of searches (``EXTMIND_FAISS_*``) and where a search runs (inline or on a worker).
"""

from __future__ import annotations

import concurrent.futures
import os
from dataclasses import dataclass

import faiss
import numpy as np

from extmind.tensor import BFLOAT16, bf16_bits_to_float32
from services.memory.kv_layout import Layout, MemoryMeta


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
