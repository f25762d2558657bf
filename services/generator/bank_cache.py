"""LOCAL retrieval: memory banks as MLX arrays on the generator's device, in an LRU bounded in bytes.

A bank is one memory's per-layer keys ([KVH, d, N]: transposed) and values ([KVH, N, d]) in the
dtype the memory is stored in — the model's own dtype for every memory Memorize wrote, so a
float16 / bfloat16 model's banks take half the bytes of float32 ones — plus the float32 inverse key
norms used for the cosine (docs/extended-mind.md, "Dtypes"), and, where the cache has room free,
the keys a large prefill's top-k reads (``Bank.prefill_keys``), counted in the same bound.
Entries are keyed by memory id and remember the memory's version (its create_time): a memory
deleted and re-created under the same id has a new version, so the stale bank is dropped instead
of served. Only the MLX thread touches this module's arrays
(``fetch_bank`` runs off it and hands it each layer to convert).
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np
from prometheus_client import Counter, Gauge

from extmind import tensor
from services.common.mlx_thread import MLXThread
from services.generator import prefill_top_k
from services.generator.extended_attention import Retrieved, local_top_k
from services.generator.kv_dtypes import from_storage
from services.generator.memory_client import StoredRows
from services.generator.memory_resolution import MemoryResolver, ResolvedMemory

HITS = Counter("extmind_generator_bank_cache_hits", "LOCAL retrieval: memory banks found on the device")
MISSES = Counter(
    "extmind_generator_bank_cache_misses", "LOCAL retrieval: memory banks not cached (fetched from the memory service)"
)
CACHED_BYTES = Gauge("extmind_generator_bank_cache_bytes", "bytes of memory banks cached on the device")
CACHED_BANKS = Gauge("extmind_generator_bank_cache_banks", "memory banks cached on the device")


@dataclass
class Bank:
    memory_id: str
    version: str
    keys: list[mx.array]  # per layer [KVH, d, N] (transposed for the retrieval's matmul) in the memory's dtype
    values: list[mx.array]
    inv_norms: list[mx.array]  # per layer [KVH, N] float32
    rows: int
    dtype: int = tensor.FLOAT32  # extmind.tensor code of keys and values
    # layer -> prefill_top_k.prefill_keys of that layer, kept from the bank's first prefill that
    # reads them (fused_attention.MATMUL_ROWS query rows or more)
    prefill: dict[int, tuple[mx.array, mx.array]] = field(default_factory=dict, repr=False)
    # asked whether the bank may grow by so many bytes (BankCache.put sets it: the cache counts
    # them, and keeps them only in room it has free; a bank it does not hold keeps none); None: a
    # bank outside any cache (tests, benches), no bound
    may_grow: Callable[[Bank, int], bool] | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        kept = (a for pair in self.prefill.values() for a in pair)
        return sum(a.nbytes for a in (*self.keys, *self.values, *self.inv_norms, *kept))

    def prefill_keys(self, layer: int) -> tuple[mx.array, mx.array]:
        """``prefill_top_k.prefill_keys`` of one layer (MLX thread; lazy arrays, evaluated with the
        forward that asked): kept with the bank where its cache has the room free, so that later
        prompts' forwards do not convert the bank again (two launches per layer; twice the keys'
        bytes, three times for bfloat16 keys). They never cost a bank its place: a cache short
        of room makes them per call, and drops kept ones before it evicts any bank."""
        kept = self.prefill.get(layer)
        if kept is None:
            kept = prefill_top_k.prefill_keys(self.keys[layer], self.inv_norms[layer])
            if self.may_grow is None or self.may_grow(self, sum(a.nbytes for a in kept)):
                self.prefill[layer] = kept
        return kept

    def drop_prefill_keys(self) -> int:
        """Forgets the kept prefill keys (a forward holding them keeps its own references) -> the
        bytes they took."""
        size = sum(a.nbytes for pair in self.prefill.values() for a in pair)
        self.prefill.clear()
        return size


def _inv_norms(keys: mx.array) -> mx.array:
    k = keys.astype(mx.float32)  # squares summed in float32: exact cosine whatever the bank's dtype
    return mx.rsqrt(mx.maximum(mx.sum(k * k, axis=-1), 1e-24))


def bank_layer(keys: np.ndarray, values: np.ndarray, dtype: int) -> tuple[mx.array, mx.array, mx.array]:
    """One layer's numpy [KVH, N, d] storage arrays of ``dtype`` -> (keys [KVH, d, N], values
    [KVH, N, d], float32 inverse key norms [KVH, N]) on the device, evaluated, bit for bit."""
    k, v = from_storage(keys, dtype), from_storage(values, dtype)
    # Row-contiguous, as the one-launch decode kernel reads them in place (fused_attention.
    # attend_top_k): from_storage makes row-major arrays, and the norms' reduction keeps its input's
    # layout on MLX's CUDA build; mx.contiguous only copies what is not (once per bank, not per step).
    norms = mx.contiguous(_inv_norms(k))
    k = mx.contiguous(k.swapaxes(-1, -2))
    mx.eval(k, v, norms)
    return k, v, norms


def bank_of_layers(memory_id: str, version: str, layers: list[tuple], dtype: int) -> Bank:
    """A Bank from the per-layer results of ``bank_layer``."""
    rows = int(layers[0][0].shape[2]) if layers else 0
    return Bank(memory_id, version, [x[0] for x in layers], [x[1] for x in layers], [x[2] for x in layers], rows, dtype)


def bank_from_numpy(
    memory_id: str, version: str, keys: list[np.ndarray], values: list[np.ndarray], dtype: int | None = None
) -> Bank:
    """Per-layer numpy [KVH, N, d] storage arrays of ``dtype`` (``extmind.tensor.STORAGE``:
    bfloat16 as uint16 bits; None = float32 or float16 read off the arrays) -> a Bank on the
    device in that dtype, bit for bit (the keys transposed to [KVH, d, N])."""
    if dtype is None:
        dtype = tensor.FLOAT16 if keys and np.asarray(keys[0]).dtype == np.float16 else tensor.FLOAT32
    return bank_of_layers(memory_id, version, [bank_layer(k, v, dtype) for k, v in zip(keys, values)], dtype)


def bank_from_stored(memory_id: str, version: str, stored: StoredRows) -> Bank:
    """A memory's rows as ``MemoryResolver.fetch`` returns them -> a Bank in their dtype."""
    return bank_from_numpy(memory_id, version, stored.keys, stored.values, stored.dtype)


def fetch_bank(resolver: MemoryResolver, memory: ResolvedMemory, mlx: MLXThread) -> Bank:
    """Fetches ``memory`` (``MemoryResolver.fetch``) and caches it on the device as it streams
    in: each layer goes to the MLX thread as soon as its last slice has arrived, while the next
    layers are still on the wire. Blocking; call it off the MLX thread. Raises what the fetch
    raises."""
    pending: dict[int, concurrent.futures.Future] = {}

    def on_layer(layer: int, keys: np.ndarray, values: np.ndarray, dtype: int) -> None:
        pending[layer] = mlx.submit(bank_layer, keys, values, dtype)

    try:
        stored = resolver.fetch(memory, on_layer=on_layer)
    except BaseException:
        for f in pending.values():
            f.cancel()
        raise
    for layer, (k, v) in enumerate(zip(stored.keys, stored.values)):
        if layer not in pending:  # every layer arrives complete; kept for a layer that did not
            pending[layer] = mlx.submit(bank_layer, k, v, stored.dtype)
    layers = [pending[layer].result() for layer in range(len(stored.keys))]
    return bank_of_layers(memory.memory_id, memory.version, layers, stored.dtype)


class LocalRetriever:
    """Top-k over the concatenated rows of one or more banks (request order)."""

    def __init__(self, banks: list[Bank]):
        if not banks:
            raise ValueError("LocalRetriever needs at least one bank")
        self.banks = banks
        if len(banks) == 1:
            b = banks[0]
            self.keys, self.values, self.inv_norms = b.keys, b.values, b.inv_norms
        else:
            # Banks of different dtypes (an old float32 memory next to a half-precision one) are
            # joined in float32, which holds every float16 / bfloat16 value exactly.
            wide = len({b.dtype for b in banks}) > 1
            cast = (lambda a: a.astype(mx.float32)) if wide else (lambda a: a)  # noqa: E731

            def cat(arrays, axis=1):
                return [mx.concatenate([cast(a) for a in layer], axis=axis) for layer in zip(*arrays)]

            self.keys = cat([b.keys for b in banks], axis=2)  # [KVH, d, N]: rows on the last axis
            self.values = cat([b.values for b in banks])
            self.inv_norms = cat([b.inv_norms for b in banks])
            mx.eval(self.keys, self.values, self.inv_norms)
        self.rows = sum(b.rows for b in banks)

    def prefill_keys(self, layer: int) -> tuple[mx.array, mx.array]:
        """``prefill_top_k.prefill_keys`` of one layer's (concatenated) bank: one bank's as it keeps
        them (``Bank.prefill_keys``); several banks' made per forward (not kept: nothing would count
        them against the cache's bound)."""
        if len(self.banks) == 1:
            return self.banks[0].prefill_keys(layer)
        return prefill_top_k.prefill_keys(self.keys[layer], self.inv_norms[layer])

    def layer_bank(self, layer: int) -> tuple[mx.array, mx.array, mx.array]:
        """One layer's (keys [KVH, d, N], inverse key norms [KVH, N] float32, values [KVH, N, d])
        for the fused kernels (services/generator/fused_attention.py)."""
        return self.keys[layer], self.inv_norms[layer], self.values[layer]

    def retrieve(self, layer: int, queries: mx.array, top_k: int, threshold: float | None) -> Retrieved:
        return local_top_k(self.keys[layer], self.inv_norms[layer], self.values[layer], queries, top_k, threshold)


def _never(bank: Bank, size: int) -> bool:
    return False


class BankCache:
    """LRU of Banks bounded in bytes. A bank larger than the bound is still returned to the
    caller (the request needs it) but not kept.

    The MLX thread gets, puts and evicts; ``contains`` may run on any thread (a request checks
    for its banks right after resolving its memories, without waiting for the MLX thread, which
    may be in the middle of decode steps), so the index is guarded by a lock. Banks are only
    dropped on the MLX thread."""

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[str, Bank] = OrderedDict()
        self.nbytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def _find(self, memory_id: str, version: str, touch: bool = True) -> tuple[Bank | None, bool]:
        """(the cached bank of ``memory_id`` or None, whether it is this version); a hit becomes
        the most recently used when ``touch``."""
        with self._lock:
            bank = self._entries.get(memory_id)
            hit = bank is not None and bank.version == version
            if hit and touch:
                self._entries.move_to_end(memory_id)
        return bank, hit

    def contains(self, memory_id: str, version: str) -> bool:
        """Whether this memory version's bank is cached (any thread; counted in the hit / miss
        metrics), which makes it the most recently used: a request that joins its memory's
        running group uses the bank without another lookup. A stale version is left for the MLX
        thread to evict."""
        hit = self._find(memory_id, version)[1]
        (HITS if hit else MISSES).inc()
        return hit

    def holds(self, memory_id: str, version: str) -> bool:
        """Whether this memory version's bank is cached (any thread; not counted, not reordered:
        a look ahead of the request's own lookup, which counts)."""
        return self._find(memory_id, version, touch=False)[1]

    def count_hits(self, n: int) -> None:
        """Counts ``n`` hits without a lookup (any thread): the banks of a request that shared
        another request's lookup, which counted them once (services/generator/memory_lookup.py)."""
        HITS.inc(n)

    def get(self, memory_id: str, version: str, *, lookup: bool = True) -> Bank | None:
        """The cached bank of this memory version, or None. ``lookup=False``: a second look for
        the same request, not counted again in the hit / miss metrics."""
        bank, hit = self._find(memory_id, version)
        if bank is not None and not hit:  # deleted and re-created: never serve the old rows
            self.evict(memory_id)
            bank = None
        if lookup:
            (MISSES if bank is None else HITS).inc()
        return bank

    def put(self, bank: Bank) -> None:
        self.evict(bank.memory_id)
        bank.may_grow = _never  # until cached: a bank the cache does not hold keeps no prefill keys
        bank.drop_prefill_keys()
        size = bank.nbytes
        if size > self.max_bytes:
            return
        with self._lock:
            self._shrink(size)
            self._entries[bank.memory_id] = bank
            self.nbytes += size
        bank.may_grow = self._may_grow
        self._publish()

    def _shrink(self, room: int) -> None:
        """Makes room for ``room`` more bytes (lock held): first the kept prefill keys go, least
        recently used banks' first (a prefill can make them again), then whole banks."""
        for bank in self._entries.values():
            if self.nbytes + room <= self.max_bytes:
                return
            self.nbytes -= bank.drop_prefill_keys()
        while self._entries and self.nbytes + room > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes
            old.drop_prefill_keys()

    def _may_grow(self, bank: Bank, size: int) -> bool:
        """Whether cached ``bank`` may keep ``size`` more bytes (its prefill keys): only in room the
        bound has free, counted then; never by evicting a bank. A bank no longer cached keeps
        nothing more (nothing would count it)."""
        with self._lock:
            if self._entries.get(bank.memory_id) is not bank or self.nbytes + size > self.max_bytes:
                return False
            self.nbytes += size
        self._publish()
        return True

    def _publish(self) -> None:
        CACHED_BYTES.set(self.nbytes)
        CACHED_BANKS.set(len(self._entries))

    def evict(self, memory_id: str) -> None:
        with self._lock:
            old = self._entries.pop(memory_id, None)
            if old is not None:
                self.nbytes -= old.nbytes
        if old is not None:
            old.drop_prefill_keys()  # whoever still holds the bank makes them per forward
            self._publish()
