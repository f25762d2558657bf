"""Building KV memories over gRPC and the brute-force numpy reference for SearchMemory."""

from __future__ import annotations

import threading
import time

import numpy as np

from extmind.tensor import (
    BFLOAT16,
    FLOAT16,
    FLOAT32,
    bf16_bits_to_float32,
    decode,
    decode_raw,
    encode,
    float32_to_bf16_bits,
)
from extmind.v1 import memory_pb2 as pb

DTYPES = {"float32": FLOAT32, "float16": FLOAT16, "bfloat16": BFLOAT16}


def random_kv(rng, layers, heads, rows, dim, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Raw storage arrays [layers, heads, rows, dim] (bf16 as uint16 bits)."""

    def one():
        x = rng.standard_normal((layers, heads, rows, dim)).astype(np.float32)
        if dtype == FLOAT32:
            return x
        if dtype == FLOAT16:
            return x.astype(np.float16)
        return float32_to_bf16_bits(x)

    return one(), one()


def as_float32(raw: np.ndarray, dtype) -> np.ndarray:
    if dtype == BFLOAT16:
        return bf16_bits_to_float32(raw)
    return raw.astype(np.float32)


def as_sent(x: np.ndarray, dtype) -> np.ndarray:
    """float32 values as they arrive after encoding to ``dtype``."""
    if dtype == BFLOAT16:
        return bf16_bits_to_float32(float32_to_bf16_bits(x))
    if dtype == FLOAT16:
        return x.astype(np.float16).astype(np.float32)
    return x.astype(np.float32)


def layout(layers, heads, dim, dtype) -> pb.MemoryLayout:
    return pb.MemoryLayout(num_layers=layers, num_kv_heads=heads, head_dim=dim, dtype=dtype)


def create(stub, memory_id, K, dtype, *, fingerprint="fp-test", token_ids=True, labels=None, positions=None):
    layers, heads, rows, dim = K.shape
    req = pb.CreateMemoryRequest(
        memory_id=memory_id,
        layout=layout(layers, heads, dim, dtype),
        model_fingerprint=fingerprint,
        labels=labels or {},
    )
    if token_ids:
        req.token_ids.extend(range(1000, 1000 + rows))
        if positions is not None:
            req.positions.extend(positions)
    return stub.CreateMemory(req, timeout=30).memory


def append_messages(memory_id, K, V, dtype, chunk_rows=None, layer_order=None):
    layers, heads, rows, dim = K.shape
    step = chunk_rows or rows
    for layer in layer_order or range(layers):
        for s in range(0, rows, step):
            yield pb.AppendMemoryRequest(
                memory_id=memory_id,
                layer=layer,
                keys=encode(K[layer][:, s : s + step], dtype=dtype),
                values=encode(V[layer][:, s : s + step], dtype=dtype),
            )


def build(stub, memory_id, K, V, dtype, *, chunk_rows=None, fingerprint="fp-test", token_ids=True):
    create(stub, memory_id, K, dtype, fingerprint=fingerprint, token_ids=token_ids)
    resp = stub.AppendMemory(append_messages(memory_id, K, V, dtype, chunk_rows), timeout=120)
    assert resp.state == pb.MEMORY_STATE_READY, resp
    return resp


class HeldAppend:
    """An AppendMemory stream kept open in a thread: it sends layer 0, then waits for
    ``release()`` before sending layer 1 and closing. ``result()`` is the server's answer."""

    def __init__(self, stub, memory_id, K, V, dtype):
        self._gate = threading.Event()
        self._out = {}

        def messages():
            yield from append_messages(memory_id, K[:1], V[:1], dtype)
            self._gate.wait(10)
            yield from append_messages(memory_id, K, V, dtype, layer_order=[1])

        self._thread = threading.Thread(
            target=lambda: self._out.setdefault("r", stub.AppendMemory(messages(), timeout=30))
        )
        self._thread.start()
        time.sleep(0.5)  # the first layer has reached the server

    def release(self):
        self._gate.set()

    def result(self):
        self._thread.join()
        return self._out["r"]


def fetch(stub, memory_id, layers=()):
    """-> {layer: (keys, values)} raw arrays, chunks checked for order and size."""
    out: dict[int, list] = {}
    for c in stub.FetchMemory(pb.FetchMemoryRequest(memory_id=memory_id, layers=layers), timeout=120):
        assert c.ByteSize() <= 4 * 1024 * 1024, c.ByteSize()
        parts = out.setdefault(c.layer, [])
        assert c.row_offset == sum(p[0].shape[1] for p in parts)
        parts.append((decode_raw(c.keys), decode_raw(c.values)))
    return {
        layer: (np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1))
        for layer, parts in out.items()
    }


def search(stub, ids, layer, Q, top_k, *, threshold=None, return_vectors=False, qdtype=FLOAT32):
    req = pb.SearchMemoryRequest(
        memory_ids=ids, layer=layer, queries=encode(Q, dtype=qdtype), top_k=top_k, return_vectors=return_vectors
    )
    if threshold is not None:
        req.sim_threshold = threshold
    resp = stub.SearchMemory(req, timeout=60)
    keys = decode_raw(resp.keys) if return_vectors else None
    values = decode_raw(resp.values) if return_vectors else None
    return decode(resp.scores), decode(resp.indices), keys, values


def cosine_reference(Q: np.ndarray, Ks: list[np.ndarray]) -> np.ndarray:
    """Exact cosine of every query against the concatenated rows, in float64.
    Q [H, q, D]; Ks: per memory [G, N, D] float32 -> [H, q, sum N]."""
    K = np.concatenate(Ks, axis=1).astype(np.float64)
    G = K.shape[0]
    H = Q.shape[0]
    rep = H // G
    kn = np.linalg.norm(K, axis=-1, keepdims=True)
    K = np.where(kn > 0, K / np.where(kn > 0, kn, 1), 0)
    Qd = Q.astype(np.float64)
    qn = np.linalg.norm(Qd, axis=-1, keepdims=True)
    Qd = np.where(qn > 0, Qd / np.where(qn > 0, qn, 1), 0)
    out = np.empty((H, Q.shape[1], K.shape[1]))
    for h in range(H):
        out[h] = Qd[h] @ K[h // rep].T
    return out


def check_search(scores, indices, ref, top_k, threshold=None, atol=2e-5):
    """Scores equal the reference top-k (sorted, within atol); every returned index really has the
    score returned for it (ties may pick any of the tied rows); masked hits are -1/-inf."""
    H, q, total = ref.shape
    k = min(top_k, total)
    assert scores.shape == (H, q, k) and indices.shape == (H, q, k)
    want = -np.sort(-ref, axis=-1)[..., :k]
    if threshold is not None:
        certain = (want <= threshold - atol) | (want > threshold + atol)
        got_masked = indices == -1
        assert np.array_equal(got_masked[certain], (want <= threshold)[certain])
        assert np.all(np.isneginf(scores[got_masked]))
        live = ~got_masked
    else:
        live = np.ones_like(indices, dtype=bool)
    assert np.allclose(scores[live], want[live], atol=atol), np.abs(scores[live] - want[live]).max()
    idx = np.where(live, indices, 0)
    assert np.all(indices[live] >= 0) and np.all(indices[live] < total)
    picked = np.take_along_axis(ref, idx, axis=-1)
    assert np.allclose(picked[live], scores[live], atol=atol)
    for h in range(H):  # no row twice in one answer
        for t in range(q):
            row = indices[h, t][live[h, t]]
            assert len(set(row.tolist())) == len(row)
    return live
