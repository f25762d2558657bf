"""A search whose KV heads are split over threads answers bit for bit as one thread does, and
the memory service's malloc thresholds are set where glibc allows (services/common/heap.py)."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys

import faiss
import numpy as np
import pytest

from extmind.tensor import BFLOAT16, FLOAT16, FLOAT32
from services.memory.kv_index import LoadedMemory, build_layer, search_loaded
from services.memory.kv_layout import READY, MemoryMeta
from tests.memory import helpers as h


def _memory(rng, name, G, rows, D, dtype, layers=2) -> LoadedMemory:
    keys, values = h.random_kv(rng, layers, G, rows, D, dtype)
    meta = MemoryMeta(name, layers, G, D, dtype, "test", rows, READY, 0, {}, 1, rows=[rows] * layers)
    return LoadedMemory.build(meta, [build_layer(meta, keys[x], values[x]) for x in range(layers)])


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
]


@pytest.mark.parametrize("G,rep,q,D,rows,top_k,threshold,dtype", CASES)
@pytest.mark.parametrize("groups", [2, 3, 8])
def test_heads_split_over_threads_answer_as_one_thread(pool, groups, G, rep, q, D, rows, top_k, threshold, dtype):
    rng = np.random.default_rng(groups * 100 + G)
    memories = [_memory(rng, f"m{i}", G, n, D, dtype) for i, n in enumerate(rows)]
    queries = rng.standard_normal((G * rep, q, D)).astype(np.float32)
    one = search_loaded(memories, 1, queries, top_k, threshold, True)
    split = search_loaded(memories, 1, queries, top_k, threshold, True, pool, groups)
    for a, b in zip(one, split):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    if threshold is not None:
        assert (one[1] == -1).any() and (one[1] >= 0).any()  # the case masks some hits, not all


def test_a_failing_head_group_fails_the_search(pool):
    rng = np.random.default_rng(0)
    memory = _memory(rng, "m", 4, 50, 16, FLOAT32)
    memory.indexes[1][3] = None  # a head of the last group (searched on the pool) is broken
    with pytest.raises(AttributeError):
        search_loaded([memory], 1, np.ones((4, 1, 16), np.float32), 5, None, False, pool, 2)


def _heap_check(env: dict) -> str:
    code = "from services.common.heap import keep_message_buffers; print(keep_message_buffers())"
    base = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**base, **env}, capture_output=True, text=True, check=True, timeout=60
    )
    return out.stdout.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_malloc_thresholds_are_set_unless_the_environment_sets_them():
    assert _heap_check({}) == "True"
    assert _heap_check({"MALLOC_MMAP_THRESHOLD_": "131072"}) == "False"
