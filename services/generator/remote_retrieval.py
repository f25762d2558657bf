"""REMOTE retrieval: one SearchMemory call per layer per forward step (docs/extended-mind.md).

Runs inside the model forward on the MLX thread: the rotated queries are evaluated, sent to the
memory service (FAISS there) and the top-k keys and values come back; the attention logits are
then the raw dots of the queries with the returned keys, exactly as in LOCAL mode.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from services.generator.extended_attention import Retrieved
from services.generator.memory_client import MemoryClient


class RemoteRetriever:
    def __init__(self, client: MemoryClient, memory_ids: list[str], rows: int):
        self.client = client
        self.memory_ids = list(memory_ids)
        self.rows = rows
        self.calls = 0

    def retrieve(self, layer: int, queries: mx.array, top_k: int, threshold: float | None) -> Retrieved:
        B, kvh, rep, L, d = queries.shape
        q = np.array(queries, dtype=np.float32)  # evaluates on this (MLX) thread
        q = q.transpose(1, 2, 0, 3, 4).reshape(kvh * rep, B * L, d)  # [H, q, d]; head h -> KV head h // rep
        r = self.client.search(self.memory_ids, layer, q, top_k, threshold)
        self.calls += 1
        k = r.indices.shape[-1]

        def back(a):  # [H, B*L, k, ...] -> [B, KVH, R, L, k, ...]
            a = a.reshape(kvh, rep, B, L, k, *a.shape[3:])
            return a.transpose(2, 0, 1, 3, 4, *range(5, a.ndim))

        keys = mx.array(back(r.keys).astype(np.float32))
        indices = back(r.indices)
        dots = mx.sum(queries[..., None, :] * keys, axis=-1)
        valid = mx.array(indices >= 0) if threshold is not None else None
        return Retrieved(
            dots=dots,
            valid=valid,
            values=mx.array(back(r.values).astype(np.float32)),
            indices=mx.array(indices.astype(np.int32)),
        )
