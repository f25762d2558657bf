"""A search whose KV heads are split over threads answers bit for bit as one thread does, and as
the search did before the split (its code is kept here as the reference)."""

from __future__ import annotations

import concurrent.futures

import faiss
import numpy as np
import pytest

from extmind.tensor import BFLOAT16, FLOAT16, FLOAT32
from services.memory.kv_layout import READY, MemoryMeta
from services.memory.kv_search import BLAS_FROM_QUERIES, LoadedMemory, build_layer, normalize_rows, search_loaded
from tests.memory import helpers as h


def _memory(rng, name, G, rows, D, dtype, layers=2) -> LoadedMemory:
    keys, values = h.random_kv(rng, layers, G, rows, D, dtype)
    meta = MemoryMeta(name, layers, G, D, dtype, "test", rows, READY, 0, {}, 1, rows=[rows] * layers)
    return LoadedMemory.build(meta, [build_layer(meta, keys[x], values[x]) for x in range(layers)])


def _reference(memories, layer, queries, top_k, threshold):
    """search_loaded as it was before the split: head by head, hits merged over the memories,
    then the keys and values copied row by row."""
    G, D = memories[0].meta.num_kv_heads, memories[0].meta.head_dim
    H, q, _ = queries.shape
    k = min(top_k, sum(m.rows for m in memories))
    qn = normalize_rows(queries).reshape(G, H // G * q, D)
    faiss.cvar.distance_compute_blas_threshold = 1 if H // G * q >= BLAS_FROM_QUERIES else 1 << 30  # FAISS's kernel
    offsets = np.cumsum([0] + [m.rows for m in memories])
    scores, indices = [], []
    for g in range(G):
        found = [
            (m.indexes[layer][g].search(qn[g], min(k, m.rows)), off) for m, off in zip(memories, offsets) if m.rows
        ]
        s = np.concatenate([f[0] for f, _ in found], axis=1)
        i = np.concatenate([f[1] + off for f, off in found], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        scores.append(np.take_along_axis(s, order, 1))
        indices.append(np.take_along_axis(i, order, 1))
    scores, indices = np.clip(np.stack(scores), -1.0, 1.0), np.stack(indices)
    if threshold is not None:
        masked = scores <= np.float32(threshold)
        scores[masked], indices[masked] = -np.inf, -1
    keys = np.zeros((*indices.shape, D), memories[0].keys[layer].dtype)
    values = np.zeros_like(keys)
    for g, n, j in np.ndindex(indices.shape):
        row = indices[g, n, j]
        for m, off in zip(memories, offsets):
            if off <= row < off + m.rows:
                keys[g, n, j], values[g, n, j] = m.keys[layer][g, row - off], m.values[layer][g, row - off]
    out = (scores, indices, keys, values)
    return tuple(x.reshape(H, q, *x.shape[2:]) for x in out)


@pytest.fixture(scope="module")
def pool():
    with concurrent.futures.ThreadPoolExecutor(
        max_workers=7, initializer=faiss.omp_set_num_threads, initargs=(1,)
    ) as p:
        yield p


# (KV heads, query heads per KV head, query tokens, head_dim, rows of each memory, top_k,
#  threshold, dtype): one KV head; the 1 B decode shape (4 and 32 queries per KV head: FAISS's
#  scan and its BLAS kernel); several memories; a threshold that masks part of the answer.
CASES = [
    (1, 4, 1, 16, [40], 5, None, FLOAT32),
    (8, 4, 1, 64, [300], 10, None, FLOAT16),
    (8, 4, 8, 64, [300], 10, None, FLOAT16),
    (3, 2, 2, 16, [30, 1, 45], 12, None, BFLOAT16),
    (4, 1, 5, 32, [120, 7], 20, 0.3, FLOAT32),
    (2, 2, 3, 16, [0, 25, 9], 30, None, FLOAT16),  # an empty memory; k > rows of the last one
]


@pytest.mark.parametrize("G,rep,q,D,rows,top_k,threshold,dtype", CASES)
@pytest.mark.parametrize("groups", [2, 3, 8])
def test_heads_split_over_threads_answer_as_one_thread(pool, groups, G, rep, q, D, rows, top_k, threshold, dtype):
    rng = np.random.default_rng(groups * 100 + G)
    memories = [_memory(rng, f"m{i}", G, n, D, dtype) for i, n in enumerate(rows)]
    queries = rng.standard_normal((G * rep, q, D)).astype(np.float32)
    want = _reference(memories, 1, queries, top_k, threshold)
    one = search_loaded(memories, 1, queries, top_k, threshold, True)
    split = search_loaded(memories, 1, queries, top_k, threshold, True, pool, groups)
    for a, b, c in zip(want, one, split):
        assert a.dtype == b.dtype == c.dtype and np.array_equal(a, b) and np.array_equal(a, c)
    if threshold is not None:
        assert (one[1] == -1).any() and (one[1] >= 0).any()  # the case masks some hits, not all


def test_a_failing_head_group_fails_the_search(pool):
    rng = np.random.default_rng(0)
    memory = _memory(rng, "m", 4, 50, 16, FLOAT32)
    memory.indexes[1][3] = None  # a head of the last group (searched on the pool) is broken
    with pytest.raises(AttributeError):
        search_loaded([memory], 1, np.ones((4, 1, 16), np.float32), 5, None, False, pool, 2)


def test_thread_count_variables(monkeypatch):
    """EXTMIND_FAISS_*THREADS: unset or empty = the default, below 1 = 1, not a whole number = a
    ValueError naming the variable (the memory service then stops at import with that line)."""
    import os
    import subprocess
    import sys

    from services.memory.kv_search import _threads_env

    name = "EXTMIND_FAISS_HEAD_THREADS"
    for raw, want in ((None, 5), ("", 5), (" 3 ", 3), ("0", 1), ("-2", 1)):
        if raw is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, raw)
        assert _threads_env(name, 5) == want
    monkeypatch.setenv(name, "2.5")
    with pytest.raises(ValueError, match=r"EXTMIND_FAISS_HEAD_THREADS='2.5' must be a whole number"):
        _threads_env(name, 5)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, EXTMIND_FAISS_HEAD_THREADS="abc", PYTHONPATH=root)
    out = subprocess.run(
        [sys.executable, "-c", "import services.memory.kv_search"], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "ValueError: EXTMIND_FAISS_HEAD_THREADS='abc' must be a whole number of threads (>= 1)"
    )
