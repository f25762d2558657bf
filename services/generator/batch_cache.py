"""mlx-lm's batch KV cache with its left padding also known on the host.

mlx-lm's ``BatchKVCache`` keeps each sequence's left padding only as a device array, and reads it
back whenever the decode batch changes: ``filter`` (a sequence finished or was removed, and the
prompt batch's split when prompts start decoding) reads it once per layer, ``extract`` once per
layer of a finished sequence. On a GPU each read waits for the forward that mlx-lm computes a
step ahead and for the copies queued with it: on the H200, 16 layers cost ~8-13 ms per batch
change, a stall of two to three decode steps every time a sequence joins or leaves
(docs/architecture.md, "Padding known on the host").

Every padding value derives from host integers (prompt lengths, cache sizes, indices), so
``HostPaddedBatchKVCache`` tracks them in a list beside the device array and answers those reads
from it: the same keys, values, offsets and padding as mlx-lm's class after every operation
(tests/generator/test_batch_cache.py), without a device read. ``HostPaddedKVCache`` is a plain
``KVCache`` whose ``merge`` (how mlx-lm batches prompt caches) makes one; the scheduler gives
its requests these caches (``prompt_cache``, ``host_padded``).
"""

from __future__ import annotations

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache


class HostPaddedKVCache(KVCache):
    """A ``KVCache`` whose batch (``merge``) is a ``HostPaddedBatchKVCache``."""

    @classmethod
    def merge(cls, caches):
        return HostPaddedBatchKVCache.merge(caches)


class HostPaddedBatchKVCache(BatchKVCache):
    """``BatchKVCache`` plus ``host_padding`` (list[int], one per sequence: ``left_padding`` as
    the host knows it). Only the methods that read or change the padding differ; each does what
    mlx-lm's does, reading the host list instead of the device array."""

    def __init__(self, left_padding: list[int]):
        super().__init__(left_padding)
        self.host_padding = [int(p) for p in left_padding]
        self._host_right: list[int] | None = None

    @classmethod
    def merge(cls, caches):
        if max(c.size() for c in caches) == 0:  # mlx-lm makes its own class here
            return cls([0] * len(caches))
        return super().merge(caches)  # cls(padding) with the host padding

    def prepare(self, *, left_padding=None, lengths=None, right_padding=None):
        super().prepare(left_padding=left_padding, lengths=lengths, right_padding=right_padding)
        if left_padding is not None:
            self.host_padding = [p + int(q) for p, q in zip(self.host_padding, left_padding)]
        if right_padding is not None and max(right_padding) > 0:
            self._host_right = [int(q) for q in right_padding]

    def finalize(self):
        if self._right_padding is not None and self._host_right is not None:
            self.host_padding = [p + q for p, q in zip(self.host_padding, self._host_right)]
        self._host_right = None
        super().finalize()

    def filter(self, batch_indices):
        """mlx-lm's ``filter``: keeps ``batch_indices`` and drops the left columns that every
        kept sequence pads, the shift taken from the host padding."""
        keep = mx.array(batch_indices, dtype=mx.int32)  # one index array for the four gathers, not one each
        if self.keys is not None:
            self.keys = self.keys[keep]
            self.values = self.values[keep]
        self.offset = self.offset[keep]
        self.left_padding = self.left_padding[keep]
        padding = [self.host_padding[i] for i in batch_indices]
        shift = min(padding)
        if shift > 0:
            if self.keys is not None:
                self.keys = self.keys[..., shift:, :]
                self.values = self.values[..., shift:, :]
            self._idx -= shift
            self.left_padding -= shift
        self.host_padding = [p - shift for p in padding]

    def extend(self, other):
        both_empty = self.keys is None and other.keys is None
        top = max(self._idx, other._idx)
        mine = self.host_padding if both_empty else [p + top - self._idx for p in self.host_padding]
        theirs = host_padding(other)
        theirs = theirs if both_empty else [p + top - other._idx for p in theirs]
        super().extend(other)
        self.host_padding = mine + theirs

    def extract(self, idx):
        """Sequence ``idx``'s cache without its padding (mlx-lm's ``extract``), as a
        ``HostPaddedKVCache``."""
        cache = HostPaddedKVCache()
        padding = self.host_padding[idx]
        cache.keys = mx.contiguous(self.keys[idx : idx + 1, :, padding : self._idx])
        cache.values = mx.contiguous(self.values[idx : idx + 1, :, padding : self._idx])
        cache.offset = cache.keys.shape[2]
        return cache

    @property
    def state(self):
        return super().state

    @state.setter
    def state(self, v):
        BatchKVCache.state.fset(self, v)
        self.host_padding = [int(p) for p in self.left_padding.tolist()]  # loaded: read once


def host_padding(cache: BatchKVCache) -> list[int]:
    """The per-sequence left padding of a batch cache: from the host when it is known there,
    else read from the device (an mlx-lm ``BatchKVCache``)."""
    if isinstance(cache, HostPaddedBatchKVCache):
        return list(cache.host_padding)
    return [int(p) for p in cache.left_padding.tolist()]


def prompt_cache(num_layers: int) -> list[HostPaddedKVCache]:
    """A fresh per-layer prompt cache for ``BatchGenerator.insert(caches=...)``."""
    return [HostPaddedKVCache() for _ in range(num_layers)]


def host_padded(cache: list[KVCache]) -> list[KVCache]:
    """A sequence's per-layer ``KVCache``s (a solo's) as ``HostPaddedKVCache``s, the same arrays."""
    out = []
    for c in cache:
        if type(c) is KVCache:
            h = HostPaddedKVCache()
            h.keys, h.values, h.offset = c.keys, c.values, c.offset
            c = h
        out.append(c)
    return out
