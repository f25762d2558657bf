"""REMOTE retrieval: one search per layer per forward step (docs/extended-mind.md).

Runs inside the model forward on the MLX thread: the rotated queries are evaluated, sent to the
memory service (FAISS there) and the top-k keys and values come back; the attention logits are
then the raw dots of the queries with the returned keys, exactly as in LOCAL mode.

The searches of one retriever (one generation batch) go over one SearchMemoryStream, opened on
the first search and closed with ``close`` or when the retriever is dropped; a memory service
without that RPC is searched with unary SearchMemory calls instead, with the same answers.

The memory service searches memories of one layout, dtype included, per call. Memories of
different dtypes in one request (an old float32 memory next to a float16 one) are searched one
dtype at a time and the hits merged by cosine, with rows numbered in request order as always.
"""

from __future__ import annotations

import functools
import time
import weakref
from dataclasses import dataclass

import mlx.core as mx
import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Histogram

from extmind import errors
from services.generator import host_staging, kernel_parts
from services.generator.extended_attention import Retrieved
from services.generator.host_staging import HostStaging
from services.generator.kv_dtypes import MX_DTYPES, from_storage
from services.generator.memory_client import MemoryClient, SearchResult, concat_results, search_requests, search_result
from services.generator.memory_resolution import ResolvedMemory
from services.generator.search_stream import SearchStream, StreamUnsupported

# What a REMOTE layer waits on the memory service for, as the generator sees it: one observation
# per retrieving layer of a forward (its searches sent, the answers parsed and checked, or the
# error they ended with), round trip and search together. A decode token of an L-layer model
# waits L of these in turn, so this is the number that bounds REMOTE decode (docs/architecture.md,
# "REMOTE's per-layer budget"); the buckets start at 0.1 ms, under what 0.2x stock would leave a
# layer on a GPU.
SEARCH_SECONDS = Histogram(
    "extmind_generator_remote_search_seconds",
    "REMOTE retrieval: seconds one layer of a forward waited on the memory service (its searches sent, "
    "their answers back and parsed)",
    buckets=(1e-4, 2.5e-4, 5e-4, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.25, 0.5, 1, 2.5, 10, 30),
)


class RemoteRetriever:
    def __init__(self, client: MemoryClient, memories: list[ResolvedMemory]):
        self.client = client
        self.memory_ids = [m.memory_id for m in memories]
        self.rows = sum(m.rows for m in memories)
        self._rows_of = {m.memory_id: m.rows for m in memories}  # as resolved when the generation began
        # Sent with every search: the memory service refuses a memory created again since (a
        # new memory under the same id, whose rows this generation never resolved).
        self._created_of = {m.memory_id: m.create_time for m in memories}
        self.calls = 0
        # dtype -> (memory ids, row offset of each in the request's concatenation, rows of each)
        self.groups: dict[int, tuple[list[str], list[int], list[int]]] = {}
        offset = 0
        for m in memories:
            ids, offsets, rows = self.groups.setdefault(m.dtype, ([], [], []))
            ids.append(m.memory_id)
            offsets.append(offset)
            rows.append(m.rows)
            offset += m.rows
        self._stream: SearchStream | None = None
        self._closer = None
        self._host: HostStaging | None = None  # queries and hits cross here (host_staging)
        self._host_release = None

    def close(self) -> None:
        """Ends the search stream, if one is open, and gives the host staging back to its pool
        after running its queued copies (both also done when the retriever is dropped, the copies
        then run by whoever takes the staging next). On the MLX thread."""
        if self._host_release is not None:
            self._host.trim(host_staging.KEEP_BYTES)  # its last copies run: the pool keeps no hits, no large buffers
            self._host_release()  # once: a later search takes another staging
            self._host = self._host_release = None
        if self._closer is not None:
            self._closer()

    def _staging(self) -> HostStaging:
        if self._host is None:
            self._host = host_staging.acquire()
            self._host_release = weakref.finalize(self, host_staging.release, self._host)
        return self._host

    def _searches(self, layer: int, searches: list[tuple[list[str], np.ndarray]], top_k, threshold):
        """One SearchResult per (memory ids, queries [H, q, d]) of ``searches``, all on ``layer``:
        their requests go out together on the stream, else as unary calls."""
        self.calls += len(searches)
        if self.client.streams_search:
            if self._stream is None or self._stream.closed:  # the first search, or the last stream failed
                if self._closer is not None:
                    self._closer.detach()
                self._stream = self.client.search_stream()
                self._closer = weakref.finalize(self, self._stream.close)
            requests = [search_requests(ids, layer, q, top_k, threshold, self._created(ids)) for ids, q in searches]
            try:
                answers = iter(self._stream.search([r for rs in requests for r in rs], f"searching layer {layer}"))
            except StreamUnsupported:
                self.client.streams_search = False  # an older memory service: unary from now on
            else:
                found = [concat_results([search_result(next(answers)) for _ in rs]) for rs in requests]
                return [self._checked(ids, r, top_k) for (ids, _), r in zip(searches, found)]
        return [
            self._checked(ids, self.client.search(ids, layer, q, top_k, threshold, self._created(ids)), top_k)
            for ids, q in searches
        ]

    def _created(self, ids: list[str]) -> list[Timestamp]:
        return [self._created_of[i] for i in ids]

    def _checked(self, ids: list[str], r: SearchResult, top_k: int) -> SearchResult:
        """``r`` when its hits are rows of the memories as resolved; raises FailedPrecondition when
        they are not: a memory deleted and created again under its id while this generation ran
        has other rows, and a row number past the resolved ones must never reach the citation
        counts (a scatter out of bounds)."""
        rows = sum(self._rows_of[i] for i in ids)
        if r.indices.shape[-1] != min(top_k, rows) or (r.indices.size and int(r.indices.max()) >= rows):
            raise errors.FailedPrecondition(
                f"memories {ids} changed while this generation searched them (deleted and created again: "
                f"no longer the {rows} rows it started with); retry the request"
            )
        return r

    def _search(self, layer: int, q: np.ndarray, top_k: int, threshold: float | None) -> SearchResult:
        if len(self.groups) == 1:
            return self._searches(layer, [(self.memory_ids, q)], top_k, threshold)[0]
        parts = []
        found = self._searches(layer, [(ids, q) for ids, _, _ in self.groups.values()], top_k, threshold)
        for (_, offsets, rows), r in zip(self.groups.values(), found):
            r = r.widened()  # mixed dtypes merge as float32
            # the group's row numbers (its memories concatenated) -> the request's
            starts = np.cumsum([0] + rows[:-1])
            which = np.searchsorted(starts, r.indices, side="right") - 1
            shift = (np.asarray(offsets) - starts)[np.maximum(which, 0)]
            parts.append(SearchResult(r.scores, np.where(r.indices >= 0, r.indices + shift, -1), r.keys, r.values))
        k = min(top_k, self.rows)
        scores = np.concatenate([p.scores for p in parts], axis=-1)
        order = np.argsort(-scores, axis=-1, kind="stable")[..., :k]  # masked hits (-inf) go last

        def merged(field: str) -> np.ndarray:
            a = np.concatenate([getattr(p, field) for p in parts], axis=2)
            idx = order if a.ndim == 3 else order[..., None]
            return np.take_along_axis(a, idx, axis=2)

        return SearchResult(*(merged(f) for f in ("scores", "indices", "keys", "values")))

    def _answer(self, layer: int, queries: mx.array, top_k: int, threshold: float | None) -> SearchResult:
        """The memory service's hits for queries [B, KVH, R, L, d] float32, evaluated here (on the
        MLX thread): SearchResult fields [H, B * L, k, ...], query head h = kv_head * R + r."""
        B, kvh, rep, L, d = queries.shape
        q = self._staging().to_host(queries.astype(mx.float32))  # evaluates on this (MLX) thread
        q = q.transpose(1, 2, 0, 3, 4).reshape(kvh * rep, B * L, d)  # [H, q, d]; head h -> KV head h // rep
        if not np.isfinite(q).all():  # the memory service would refuse them as a bad request
            raise errors.FailedPrecondition(
                f"this generation's queries at layer {layer} are not finite (NaN or inf): the model's "
                f"arithmetic overflowed, e.g. on memories whose keys or values are far larger than a model "
                f"produces (memories {self.memory_ids}); check what wrote them"
            )
        t0 = time.perf_counter()
        try:
            return self._search(layer, q, top_k, threshold)
        finally:  # a failed wait too (a stuck memory service shows as waits at the client's timeout)
            SEARCH_SECONDS.observe(time.perf_counter() - t0)

    def retrieve(self, layer: int, queries: mx.array, top_k: int, threshold: float | None) -> Retrieved:
        B, kvh, rep, L, d = queries.shape
        r = self._answer(layer, queries, top_k, threshold)

        def back(a):
            return _per_query(a, B, kvh, rep, L)

        # Widened to float32 by MLX (exact, as numpy's widening; half the bytes to the device).
        keys = from_storage(back(r.keys), r.dtype).astype(mx.float32)
        indices = back(r.indices)
        dots = mx.sum(queries[..., None, :] * keys, axis=-1)
        valid = mx.array(indices >= 0) if threshold is not None else None
        return Retrieved(
            dots=dots,
            valid=valid,
            values=from_storage(back(r.values), r.dtype).astype(mx.float32),
            indices=mx.array(indices.astype(np.int32)),
        )

    def retrieve_rows(
        self, layer: int, queries: mx.array, top_k: int, threshold: float | None, indices: bool
    ) -> HitRows:
        """``retrieve``'s hits in the form the fused attention kernels take memories
        (``fused_attention.attend``, ``prefill_attention.attend``: rows into a bank of values),
        for queries [B, KVH, R, L, d] float32: the hits' keys and values reach the device as one
        array (through ``host_staging``), the values stay in the memory's dtype, and the raw dots
        are ``retrieve``'s, bit for bit.
        ``indices``: whether to return the memory rows (citations). Raises as ``retrieve``."""
        B, kvh, rep, L, d = queries.shape
        r = self._answer(layer, queries, top_k, threshold)
        k = r.indices.shape[-1]
        found = _per_query(r.indices, B, kvh, rep, L).reshape(B, kvh * rep, L, k)
        found = np.ascontiguousarray(found, dtype=np.int32)
        masked = _masked_rows(found, kvh)
        # [H, B * L, k, d] -> [KVH, R * B * L * k, d]: KV head g's hits in ``_hit_layout``'s rows;
        # keys and values cross to the device in one copy, the rows with them when some are
        # masked, the memory rows when asked (host_staging: not as MLX's host-made arrays).
        kv = np.stack([r.keys, r.values]).reshape(2, kvh, rep * B * L * k, d)
        extra = [a for a in (masked, found if indices else None) if a is not None]
        staged = [(kv, MX_DTYPES[r.dtype])] + [(a, mx.int32) for a in extra]
        kv, *moved = self._staging().to_device(staged)
        keys, values = mx.split(kv, 2)
        values = values.reshape(kvh, rep * B * L * k, d)
        keys = _per_query(keys.reshape(kvh * rep, B * L, k, d), B, kvh, rep, L).astype(mx.float32)
        dots = mx.sum(queries[..., None, :] * keys, axis=-1).reshape(B, kvh * rep, L, k)
        rows = moved.pop(0) if masked is not None else _hit_rows(B, kvh, rep, L, k)
        return HitRows(rows, dots, values, moved[0] if indices else None)


def _per_query(a, B: int, kvh: int, rep: int, L: int):
    """The memory service's per-head answer [H, B * L, k, ...] in the attention's layout
    [B, KVH, R, L, k, ...] (query head h = kv_head * R + r); a numpy or MLX array, as a view."""
    a = a.reshape(kvh, rep, B, L, *a.shape[2:])
    return a.transpose(2, 0, 1, 3, 4, *range(5, a.ndim))


@dataclass
class HitRows:
    """One layer's REMOTE hits as the fused attention kernels take memories (``retrieve_rows``)."""

    rows: mx.array  # [B, H, L, k] int32 rows of ``values`` (-1 where the threshold masked the hit)
    dots: mx.array  # [B, H, L, k] float32 raw q . k
    values: mx.array  # [KVH, R * B * L * k, d] the hits' values in the memory's dtype
    indices: mx.array | None  # [B, H, L, k] int32 rows of the memories (-1: masked), when asked


def _masked_rows(found: np.ndarray, kvh: int) -> np.ndarray | None:
    """When the threshold masked a hit: the rows the attend kernels read for hits ``found``
    [B, H, L, k] (memory rows, -1 where masked; H = KVH * R), i.e. where ``HitRows.values`` holds
    each query head's hit (``_hit_layout``), -1 where masked; row-contiguous, as the kernels index
    it. Else None: the rows are ``_hit_rows``, made once per shape on the device."""
    if (found >= 0).all():
        return None
    B, H, L, k = found.shape
    return np.where(found >= 0, _hit_layout(B, kvh, H // kvh, L, k), -1).astype(np.int32)


def _hit_layout(B: int, kvh: int, rep: int, L: int, k: int) -> np.ndarray:
    """[B, KVH * R, L, k] int32, C-contiguous: the row of ``HitRows.values`` that holds each
    query head's hit (query head g * R + i, token (b, l), hit j: ((i * B + b) * L + l) * k + j).
    C order matters: MLX keeps a numpy array's strides, and the kernels read rows by index."""
    rows = np.arange(rep * B * L * k, dtype=np.int32).reshape(rep, B, L, k).transpose(1, 0, 2, 3)
    return np.ascontiguousarray(np.broadcast_to(rows[:, None], (B, kvh, rep, L, k)).reshape(B, kvh * rep, L, k))


@functools.lru_cache(maxsize=64)
def _hit_rows(B: int, kvh: int, rep: int, L: int, k: int) -> mx.array:
    """``_hit_layout`` on the device, made once per shape."""
    return kernel_parts.on_device(mx.array(_hit_layout(B, kvh, rep, L, k)))
