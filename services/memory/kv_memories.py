"""The KV memories engine: create, append, get, list, delete (and reap), fetch and search, over the store in
Redis (``KVStore``, the source of truth) and the indexes in RAM (``KVIndex``), kept in step here.

Knows nothing of gRPC: it takes and returns numpy arrays, plain values and the small dataclasses
here and in ``kv_append``, validates every request and raises ``extmind.errors``. The wire format is docs/contract.md;
what a KV memory is for, docs/extended-mind.md.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from extmind.errors import FailedPrecondition, InvalidArgument, NotFound
from extmind.tensor import BFLOAT16, FLOAT16, FLOAT32, ITEMSIZE, dtype_name
from services.memory import limits, metrics
from services.memory.kv_append import AppendStream, WriterSlots
from services.memory.kv_index import KVIndex
from services.memory.kv_layout import (
    BUILDING,
    Layout,
    MemoryMeta,
    check_id,
    new_memory_id,
    now_us,
)
from services.memory.kv_search import LoadedMemory
from services.memory.kv_store import DELETED, KEPT_OTHER_INCARNATION, MISSING, KVStore

log = logging.getLogger("extmind.memory")

KV_DTYPES = (FLOAT32, FLOAT16, BFLOAT16)  # dtypes that can hold keys and values (and queries)


@dataclass
class RowSlice:
    """Rows [row_offset, row_offset + n) of one layer: keys and values [num_kv_heads, n, head_dim]
    in the memory's storage dtype (bfloat16 as uint16 bits)."""

    layer: int
    row_offset: int
    keys: np.ndarray
    values: np.ndarray


@dataclass
class SearchHits:
    """scores float32 [H, q, k] (cosine; -inf where masked), indices int64 [H, q, k] (rows of the
    memories concatenated in request order; -1 where masked), keys and values [H, q, k, D] in
    ``dtype``'s storage or None."""

    scores: np.ndarray
    indices: np.ndarray
    keys: np.ndarray | None
    values: np.ndarray | None
    dtype: int


def _check_layout(layout: Layout | None) -> Layout:
    if layout is None:
        raise InvalidArgument("layout is missing: give num_layers, num_kv_heads, head_dim and dtype")
    for name, limit in limits.MAX_LAYOUT.items():
        v = getattr(layout, name)
        if not 1 <= v <= limit:
            raise InvalidArgument(f"layout.{name} is {v}; it must be between 1 and {limit}")
    if layout.dtype not in KV_DTYPES:
        raise InvalidArgument(
            f"layout.dtype {dtype_name(layout.dtype)} cannot hold keys and values; use "
            "DTYPE_FLOAT32, DTYPE_FLOAT16 or DTYPE_BFLOAT16"
        )
    return layout


def _check_positions(positions: list[int]) -> None:
    """Row -> token position in the memorized text: strictly increasing, below 2**32 - 1 (a
    citation's end, one past its last position, is a uint32 too). InvalidArgument otherwise."""
    if not positions:
        return
    p = np.asarray(positions, dtype=np.int64)
    if p.max() >= 2**32 - 1:
        raise InvalidArgument(
            f"positions holds {int(p.max())}: a token position must be below {2**32 - 1} "
            "(a citation's end is the last position + 1)"
        )
    down = np.flatnonzero(np.diff(p) <= 0)
    if down.size:
        i = int(down[0]) + 1
        raise InvalidArgument(
            "positions must be strictly increasing (each row's token position in the text, in order): "
            f"positions[{i}] = {int(p[i])} follows {int(p[i - 1])}"
        )


def _check_labels(labels: dict[str, str]) -> None:
    if len(labels) > limits.MAX_LABELS or any(
        not k or len(k) > limits.MAX_LABEL_KEY_CHARS or len(v) > limits.MAX_LABEL_VALUE_CHARS for k, v in labels.items()
    ):
        raise InvalidArgument(
            f"labels: at most {limits.MAX_LABELS}, keys 1-{limits.MAX_LABEL_KEY_CHARS} and "
            f"values up to {limits.MAX_LABEL_VALUE_CHARS} characters"
        )


class KVMemories:
    """The KV memories of one service. ``max_answer_bytes``: the response budget (--max-response-mb):
    the largest search answer built, and the most bytes of one FetchMemory message."""

    def __init__(self, store: KVStore, index: KVIndex, *, max_top_k: int = limits.MAX_TOP_K, max_answer_bytes: int):
        self.store = store
        self.index = index
        self.max_top_k = max_top_k
        self.max_answer_bytes = max_answer_bytes
        self._writers = WriterSlots()

    # ---------------------------------------------------------------- catalogue

    async def create(
        self,
        memory_id: str,
        layout: Layout | None,
        fingerprint: str,
        *,
        token_ids: list[int] | None = None,
        positions: list[int] | None = None,
        labels: dict[str, str] | None = None,
    ) -> MemoryMeta:
        """A new BUILDING memory. ``memory_id`` "" picks one; ``token_ids`` (int32) fix the rows per
        layer (READY once every layer holds them all), else the memory is READY when an append
        stream ends with every layer equally long. ``positions`` (uint32): one per token or none,
        strictly increasing (each row's token position in the text; a citation spans [first,
        last + 1), so the largest uint32 is out). Raises InvalidArgument, AlreadyExists, Unavailable (Redis)."""
        memory_id = check_id(memory_id) if memory_id else new_memory_id()
        layout = _check_layout(layout)
        if not fingerprint or len(fingerprint) > limits.MAX_FINGERPRINT_CHARS:
            raise InvalidArgument(
                f"model_fingerprint must be 1-{limits.MAX_FINGERPRINT_CHARS} characters: the "
                "identity of the model that produced the rows (GeneratorService.GetInfo returns it)"
            )
        token_ids = [] if token_ids is None else list(token_ids)
        positions = [] if positions is None else list(positions)
        labels = {} if labels is None else dict(labels)
        if token_ids and min(token_ids) < 0:
            raise InvalidArgument(
                f"token_ids holds a negative id ({min(token_ids)}): token ids are vocabulary indices (>= 0)"
            )
        if positions and len(positions) != len(token_ids):
            raise InvalidArgument(
                f"positions has {len(positions)} entries but token_ids has "
                f"{len(token_ids)}; give one position per token or none"
            )
        _check_positions(positions)
        _check_labels(labels)
        meta = MemoryMeta(
            memory_id=memory_id,
            num_layers=layout.num_layers,
            num_kv_heads=layout.num_kv_heads,
            head_dim=layout.head_dim,
            dtype=layout.dtype,
            fingerprint=fingerprint,
            expected=len(token_ids) if token_ids else -1,
            state=BUILDING,
            bytes=0,
            labels=labels,
            create_us=now_us(),
        )
        meta = await self.store.create(
            meta,
            np.asarray(token_ids, "<i4") if token_ids else None,
            np.asarray(positions, "<u4") if positions else None,
        )
        self.index.drop(memory_id)  # forget any stale RAM copy of an id deleted elsewhere
        log.info(
            "memory created",
            extra={
                "memory_id": memory_id,
                "layout": [layout.num_layers, layout.num_kv_heads, layout.head_dim, dtype_name(layout.dtype)],
                "tokens": len(token_ids),
            },
        )
        return meta

    async def get(
        self, memory_id: str, *, include_tokens: bool = False
    ) -> tuple[MemoryMeta, np.ndarray | None, np.ndarray | None]:
        """-> (meta, token ids int32 [n] or None, positions uint32 [n] or None). NotFound if missing."""
        check_id(memory_id)
        if not include_tokens:
            return await self.store.get(memory_id), None, None
        return await self.store.get_with_tokens(memory_id)  # one snapshot of meta and tokens

    async def list(
        self, fingerprint: str = "", page_size: int = 0, page_token: str = ""
    ) -> tuple[list[MemoryMeta], str]:
        """One page of memories in id order (of one model when ``fingerprint``), and the token of
        the next page ("" at the end). ``page_size`` 0 = the default; larger than the most is cut."""
        size = min(page_size or limits.DEFAULT_PAGE_SIZE, limits.MAX_PAGE_SIZE)
        return await self.store.list(fingerprint, size, page_token)

    async def delete(self, memory_id: str, create_us: int | None = None) -> None:
        """Deletes the memory from Redis and RAM. NotFound if missing; with ``create_us``,
        FailedPrecondition when the memory under the id was created at another time (kept)."""
        check_id(memory_id)
        done = await self._remove(memory_id, create_us=create_us)
        if done == MISSING:
            raise NotFound(f"memory {memory_id!r} does not exist; ListMemories shows the stored ones")
        if done == KEPT_OTHER_INCARNATION:
            raise FailedPrecondition(
                f"memory {memory_id!r} was deleted and created again since the create_time given; not deleted "
                "(GetMemory shows the current one)"
            )
        log.info("memory deleted", extra={"memory_id": memory_id})

    async def reap(self, memory_id: str, idle_us: int) -> bool:
        """Deletes the memory, as ``delete`` does, only if it is BUILDING and no append touched it
        for more than ``idle_us`` microseconds (checked atomically with the deletion), and no
        append stream of this service holds it. -> whether it was deleted (``kv_reaper``)."""
        if memory_id in self._writers.held():
            return False
        return await self._remove(memory_id, idle_us=idle_us) == DELETED

    def writing(self) -> set[str]:
        """Ids of the memories an append stream of this service holds open now."""
        return set(self._writers.held())

    async def _remove(self, memory_id: str, idle_us: int | None = None, create_us: int | None = None) -> int:
        """The one delete path (DeleteMemory and the reaper): every Redis key and the RAM indexes.
        -> ``KVStore.delete``'s code. The reaper's memory may have turned READY (and started
        loading) since it was picked, and a conditional delete may find another incarnation: only
        what is deleted is dropped."""
        unconditional = idle_us is None and create_us is None
        if unconditional:
            self.index.drop(memory_id)
        done = await self.store.delete(memory_id, idle_us=idle_us, create_us=create_us)
        if done == DELETED or unconditional:
            self.index.drop(memory_id)  # a load that started meanwhile must not bring it back
        return done

    # ---------------------------------------------------------------- rows

    def append_stream(self) -> AppendStream:
        """``async with kv.append_stream() as stream``: see ``AppendStream``."""
        return AppendStream(self.store, self.index, self._writers)

    async def fetch(
        self, memory_id: str, layers: list[int] | None = None, *, chunk_bytes: int = limits.FETCH_CHUNK_BYTES
    ) -> tuple[MemoryMeta, Iterator[RowSlice]]:
        """The rows of a READY memory, layer by layer (``layers``, default all, in that order), in
        slices of at most ``chunk_bytes`` of keys + values (at least one row; an empty layer gives
        one empty slice). Raises NotFound, FailedPrecondition (not READY), InvalidArgument."""
        check_id(memory_id)
        loaded = await self.index.rows(memory_id)  # no need to wait for a load's index build
        m = loaded.meta
        layers = list(layers or range(m.num_layers))
        bad = [x for x in layers if not 0 <= x < m.num_layers]
        if bad:
            raise InvalidArgument(
                f"layers {bad} are out of range: the memory has {m.num_layers} layers (0-{m.num_layers - 1})"
            )
        if len(set(layers)) != len(layers):
            raise InvalidArgument("layers names a layer more than once")
        chunk_bytes = min(chunk_bytes, self.max_answer_bytes - limits.ANSWER_ENVELOPE_BYTES)
        step = max(1, chunk_bytes // (2 * m.num_kv_heads * m.head_dim * ITEMSIZE[m.dtype]))

        def slices() -> Iterator[RowSlice]:
            with self.index.fetching(memory_id):  # a load of this memory builds its indexes after
                for layer in layers:
                    keys, values = loaded.keys[layer], loaded.values[layer]
                    for start in range(0, max(loaded.rows, 1), step):
                        yield RowSlice(layer, start, keys[:, start : start + step], values[:, start : start + step])

        return m, slices()

    # ---------------------------------------------------------------- search

    async def _loaded_for_search(self, memory_ids: list[str], create_us=()) -> list[LoadedMemory]:
        if not memory_ids:
            raise InvalidArgument("memory_ids is empty: name at least one memory to search")
        if len(set(memory_ids)) != len(memory_ids):
            dup = sorted({m for m in memory_ids if memory_ids.count(m) > 1})
            raise InvalidArgument(f"memory_ids names {dup} more than once; name each memory once")
        for m in memory_ids:
            check_id(m)
        if create_us and len(create_us) != len(memory_ids):
            raise InvalidArgument(
                f"create_times has {len(create_us)} entries for {len(memory_ids)} memory_ids: give one per memory "
                "or none"
            )
        found = [await self.index.get(m) for m in memory_ids]
        for loaded, want in zip(found, create_us):
            if loaded.meta.create_us != want:
                raise FailedPrecondition(
                    f"memory {loaded.meta.memory_id!r} was deleted and created again since it was resolved "
                    "(its create_time differs); get it again and retry"
                )
        first = found[0].meta
        for other in (x.meta for x in found[1:]):
            if other.fingerprint != first.fingerprint:
                raise InvalidArgument(
                    f"memories {first.memory_id!r} and {other.memory_id!r} come from different models "
                    f"({first.fingerprint!r} vs {other.fingerprint!r}); search them separately"
                )
            if other.layout != first.layout:
                raise InvalidArgument(
                    f"memories {first.memory_id!r} and {other.memory_id!r} have different layouts "
                    f"({first.layout} vs {other.layout}); search them separately"
                )
        return found

    async def search(
        self,
        memory_ids: list[str],
        layer: int,
        queries: np.ndarray,
        top_k: int,
        *,
        sim_threshold: float | None = None,
        return_vectors: bool = False,
        create_us=(),
    ) -> SearchHits:
        """Exact cosine top-k over one layer of READY memories (their rows concatenated in order).

        ``queries`` float32 [H, q, D], H a multiple of the memories' KV heads (GQA: query head h
        searches KV head h // (H / num_kv_heads)); k = min(top_k, rows). Hits scoring <=
        ``sim_threshold`` are masked. Raises InvalidArgument, NotFound, FailedPrecondition (not
        READY), InvalidArgument also when the answer would exceed ``max_answer_bytes`` (the response
        budget, --max-response-mb: a request too large is not retryable). ``create_us``: the
        creation time (microseconds) the caller resolved each memory at, or () not to check;
        FailedPrecondition when a memory was created again since."""
        started = time.perf_counter()
        if not 1 <= top_k <= self.max_top_k:
            raise InvalidArgument(f"top_k is {top_k}; it must be between 1 and {self.max_top_k} (k = min(top_k, rows))")
        if sim_threshold is not None and math.isnan(sim_threshold):
            raise InvalidArgument("sim_threshold is NaN; give a number (cosine, -1..1) or leave it unset")
        H, q, D = queries.shape
        if H == 0 or q == 0 or D == 0:
            raise InvalidArgument(
                f"queries has shape {list(queries.shape)}; it needs at least one head, one query token and head_dim > 0"
            )
        if not np.isfinite(queries).all():
            raise InvalidArgument("queries holds NaN or infinite values")
        found = await self._loaded_for_search(list(memory_ids), create_us)
        m = found[0].meta
        if not 0 <= layer < m.num_layers:
            raise InvalidArgument(
                f"layer {layer} is out of range: the memories have {m.num_layers} layers (0-{m.num_layers - 1})"
            )
        if D != m.head_dim:
            raise InvalidArgument(f"queries have head_dim {D}; the memories have head_dim {m.head_dim}")
        if H % m.num_kv_heads:
            raise InvalidArgument(
                f"queries have {H} heads, not a multiple of the memories' {m.num_kv_heads} KV "
                "heads (GQA: query head h searches KV head h // (H / num_kv_heads))"
            )
        rows = sum(x.rows for x in found)
        k = min(top_k, rows)
        size = H * q * k * 12 + (2 * H * q * k * D * ITEMSIZE[m.dtype] if return_vectors else 0)
        if size > self.max_answer_bytes - limits.ANSWER_ENVELOPE_BYTES:
            raise InvalidArgument(
                f"the answer would be {size / 2**20:.1f} MiB, over the {self.max_answer_bytes / 2**20:.3g} MiB "
                "response budget (--max-response-mb); split the query tokens over several calls, or ask "
                "for a smaller top_k or no vectors"
            )
        t0 = time.perf_counter()
        scores, indices, keys, values = await self.index.search(
            found, layer, queries, top_k, sim_threshold, return_vectors
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "search",
                extra={
                    "memories": len(found),
                    "rows": rows,
                    "heads": H,
                    "q": q,
                    "k": int(scores.shape[-1]),
                    "ms": round((time.perf_counter() - t0) * 1e3, 3),
                },
            )
        metrics.SEARCHES.labels(metrics.KV).inc()
        metrics.SEARCH_SECONDS.labels(metrics.KV).observe(time.perf_counter() - started)
        return SearchHits(scores, indices, keys, values, m.dtype)
