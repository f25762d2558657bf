"""SearchMemory equals a brute-force numpy top-k over random data, for many shapes."""

from __future__ import annotations

import itertools

import grpc
import numpy as np
import pytest

from extmind.tensor import BFLOAT16, FLOAT16, FLOAT32
from tests.memory import helpers as h


@pytest.fixture(scope="module")
def svc(module_memory_service):
    return module_memory_service


_ids = itertools.count()

# (kv heads G, query heads per KV head, query tokens q, head_dim, rows of each memory, top_k,
#  threshold, dtype)
CASES = [
    (1, 1, 1, 16, [50], 5, None, FLOAT32),
    (2, 4, 1, 32, [100], 10, None, FLOAT16),  # GQA 8 over 2
    (8, 4, 1, 128, [300], 16, None, FLOAT16),  # 32 query heads over 8 KV heads
    (4, 2, 7, 64, [200], 8, None, BFLOAT16),  # q > 1
    (2, 1, 3, 8, [5], 50, None, FLOAT32),  # top_k > rows
    (2, 2, 2, 16, [30, 1, 45], 12, None, FLOAT16),  # several memories
    (2, 3, 4, 16, [20, 25], 60, None, FLOAT32),  # several memories, top_k > all rows
    (4, 1, 5, 32, [120], 20, 0.1, FLOAT32),  # threshold masks the tail
    (2, 2, 3, 16, [40, 40], 10, -1.0, BFLOAT16),  # threshold -1: only exact opposites masked
    (1, 4, 2, 8, [64], 64, 0.0, FLOAT16),  # threshold 0, k = rows
    (2, 1, 1, 16, [10, 10], 5, 0.99, FLOAT32),  # threshold masks almost everything
]


@pytest.mark.parametrize("G,rep,q,D,rows,top_k,threshold,dtype", CASES)
def test_search_equals_bruteforce(svc, G, rep, q, D, rows, top_k, threshold, dtype):
    rng = np.random.default_rng(hash((G, rep, q, D, tuple(rows), top_k)) % 2**32)
    stub = svc.stub()
    layers = 2
    ids, Ks, Vs = [], [], []
    for n in rows:
        K, V = h.random_kv(rng, layers, G, n, D, dtype)
        mid = f"s{next(_ids)}"
        h.build(stub, mid, K, V, dtype, chunk_rows=max(1, n // 3))
        ids.append(mid)
        Ks.append(K)
        Vs.append(V)
    H = G * rep
    for layer in range(layers):
        for qdtype in (FLOAT32, dtype):
            Q = rng.standard_normal((H, q, D)).astype(np.float32)
            scores, indices, keys, values = h.search(
                stub, ids, layer, Q, top_k, threshold=threshold, return_vectors=True, qdtype=qdtype
            )
            ref = h.cosine_reference(h.as_sent(Q, qdtype), [h.as_float32(K[layer], dtype) for K in Ks])
            live = h.check_search(scores, indices, ref, top_k, threshold)
            # Returned vectors are the stored rows of the hits (zeros where masked).
            allK = np.concatenate([K[layer] for K in Ks], axis=1)
            allV = np.concatenate([V[layer] for V in Vs], axis=1)
            k = indices.shape[-1]
            assert keys.shape == (H, q, k, D) and values.shape == (H, q, k, D)
            for hh in range(H):
                g = hh // rep
                idx = np.where(live[hh], indices[hh], 0)
                assert np.array_equal(keys[hh][live[hh]], allK[g][idx][live[hh]])
                assert np.array_equal(values[hh][live[hh]], allV[g][idx][live[hh]])
                assert not keys[hh][~live[hh]].any() and not values[hh][~live[hh]].any()


def test_zero_rows_and_zero_queries_give_zero_not_nan(svc):
    stub = svc.stub()
    K = np.zeros((1, 2, 6, 8), np.float32)
    K[0, :, 3:] = 1.0
    V = np.ones_like(K)
    mid = f"z{next(_ids)}"
    h.build(stub, mid, K, V, FLOAT32)
    Q = np.zeros((2, 1, 8), np.float32)
    Q[1, 0, 0] = 1.0
    scores, indices, _, _ = h.search(stub, [mid], 0, Q, 6)
    assert np.isfinite(scores).all()
    assert np.allclose(scores[0], 0.0)
    assert np.allclose(np.sort(scores[1, 0])[-3:], 1 / np.sqrt(8), atol=1e-6)
    assert set(indices[1, 0, :3].tolist()) == {3, 4, 5}


def test_search_is_per_layer_and_per_kv_head(svc):
    """A key planted in layer 1, KV head 1 is found only there, by query heads 2 and 3."""
    stub = svc.stub()
    rng = np.random.default_rng(7)
    K, V = h.random_kv(rng, 2, 2, 40, 16, FLOAT32)
    target = rng.standard_normal(16).astype(np.float32) * 10
    K[1, 1, 17] = target
    mid = f"p{next(_ids)}"
    h.build(stub, mid, K, V, FLOAT32)
    Q = np.broadcast_to(target, (4, 1, 16)).copy()
    _, idx1, _, _ = h.search(stub, [mid], 1, Q, 1)
    assert idx1[2, 0, 0] == 17 and idx1[3, 0, 0] == 17
    assert idx1[0, 0, 0] != 17 or np.isclose(K[1, 0, 17] @ target, 0)


def test_search_not_ready_is_failed_precondition(svc):
    stub = svc.stub()
    rng = np.random.default_rng(1)
    K, V = h.random_kv(rng, 2, 1, 10, 8, FLOAT32)
    mid = f"n{next(_ids)}"
    h.create(stub, mid, K, FLOAT32)
    stub.AppendMemory(h.append_messages(mid, K[:1], V[:1], FLOAT32), timeout=30)  # layer 0 only
    with pytest.raises(grpc.RpcError) as e:
        h.search(stub, [mid], 0, np.ones((1, 1, 8), np.float32), 3)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "BUILDING" in e.value.details()
