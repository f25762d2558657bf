"""The tensor-core prefill top-k (prefill_top_k_mma.py: candidates by tensor-core scores, then an
exact re-ranking) run as written on the CPU emulator (cuda_emulator.py; its ``em_mma_16816`` is the
PTX fragment layout by shuffles), through ``fused_attention.top_k_rows`` on a GPU said to be of
compute capability 9.0, checked against the exact float64 cosine top-k, tie-aware
(test_kernels_emulated._check). test_fused_attention.py checks the same on a real GPU."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from services.generator import fused_attention as fa
from services.generator import kernel_parts, prefill_top_k, prefill_top_k_mma

from . import cuda_emulator
from .test_kernels_emulated import _check, _inputs, pytestmark  # noqa: F401 (the emulator's skip)


@pytest.fixture
def mma(monkeypatch):
    """The emulator for ``mx.fast.cuda_kernel`` on a GPU of compute capability 9.0; records the
    counts of candidates each call listed."""
    monkeypatch.setattr(mx.fast, "cuda_kernel", cuda_emulator.cuda_kernel)
    monkeypatch.setattr(mx, "device_info", lambda: {"compute_capability_major": 9, "compute_capability_minor": 0})
    monkeypatch.setattr(fa, "MATMUL_ROWS", 16)
    made = (kernel_parts.tensor_cores, prefill_top_k_mma.candidates_kernel, prefill_top_k_mma.rerank_kernel)
    for m in made:
        m.cache_clear()
    counts = []
    kernel = prefill_top_k_mma.candidates_kernel()

    def recording(**kw):
        out = kernel(**kw)
        counts.append(np.array(out[1]))
        return out

    monkeypatch.setattr(prefill_top_k_mma, "candidates_kernel", lambda: recording)
    monkeypatch.setattr(prefill_top_k, "_kernel", None)  # the matmul path's kernel must not run
    yield counts
    for m in made:
        m.cache_clear()


# name: (B, H, KVH, L, d, n, top_k, threshold, query dtype, bank dtype, mode)
CASES = {
    # float16 queries go in as they are (scores |q| times a cosine)
    "half_random_d64": (1, 8, 2, 6, 64, 512, 10, None, mx.float16, mx.float16, "random"),
    # 2 x 4 x 40 = 160 query rows per (b, g): two blocks, the second partly past them
    "half_two_blocks_per_head_b2_rows_past_a_tile": (2, 8, 2, 40, 64, 200, 8, None, mx.float16, mx.float16, "random"),
    "half_d80_threshold_n_not_a_tile_multiple": (1, 8, 2, 5, 80, 301, 8, 0.05, mx.float16, mx.float16, "random"),
    "half_d128_k32_ties_threshold": (1, 4, 1, 4, 128, 300, 32, 0.0, mx.float16, mx.float16, "ties"),
    "half_zero_queries_and_keys": (2, 4, 2, 4, 32, 256, 9, None, mx.float16, mx.float16, "zeros"),
    # every cosine within the bound: more than CAPACITY candidates, the exact scan of every row
    "half_near_ties_exact_scan": (1, 8, 2, 4, 64, 400, 16, None, mx.float16, mx.float16, "near"),
    # 40 rows near the queries: 33 ... 64 candidates, the lanes' lists and the warp's argmax
    "half_group_40_listed": (1, 8, 2, 2, 32, 515, 16, None, mx.float16, mx.float16, "group_40"),
    "half_group_31_one_sort": (1, 8, 2, 2, 32, 601, 8, None, mx.float16, mx.float16, "group_31"),
    # other queries are made unit and rounded to float16; the bank's own keys for the exact dots
    "bfloat16_queries_and_bank_d96": (1, 8, 2, 4, 96, 300, 10, None, mx.bfloat16, mx.bfloat16, "random"),
    "float32_queries_and_bank_gqa1": (1, 4, 4, 4, 48, 257, 7, None, mx.float32, mx.float32, "random"),
    "float32_queries_half_bank_mha_threshold": (2, 2, 2, 8, 16, 100, 4, 0.1, mx.float32, mx.float16, "random"),
    "one_row_bank": (1, 8, 2, 3, 16, 1, 3, None, mx.float16, mx.float16, "random"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tensor_core_prefill_top_k_is_the_exact_top_k(case, mma):
    B, H, KVH, L, d, n, top_k, threshold, q_dtype, dtype, mode = CASES[case]
    assert prefill_top_k_mma.applies(d, True) and B * H * L >= fa.MATMUL_ROWS
    q, keys = _inputs(np.random.default_rng(sorted(CASES).index(case)), B, H, KVH, L, d, n, mode)
    q_mx = mx.array(q).astype(q_dtype)
    keys_mx = mx.array(keys).astype(dtype)
    inv = mx.rsqrt(mx.maximum(mx.sum(keys_mx.astype(mx.float32) ** 2, axis=-1), 1e-24))
    keys_t = mx.contiguous(keys_mx.swapaxes(-1, -2))
    rows, dots = fa.top_k_rows(q_mx, keys_t, inv, top_k, threshold)
    q_seen, keys_seen = np.array(q_mx.astype(mx.float32)), np.array(keys_mx.astype(mx.float32))
    _check(q_seen, keys_seen, np.array(rows), np.array(dots), top_k, threshold)
    (counts,) = mma
    assert counts.shape == (B * H * L,) and (counts >= min(top_k, n)).all(), counts
    if mode == "near":
        assert (counts > prefill_top_k_mma.CAPACITY).any()  # the exact scan ran
    if mode == "group_40":
        assert ((counts > 32) & (counts <= prefill_top_k_mma.CAPACITY)).any()  # the listed path ran
    # The same from the unit and row-major keys a cached bank keeps (bank_cache.Bank.prefill_keys).
    made = prefill_top_k.prefill_keys(keys_t, inv)
    assert made[0].dtype == mx.float16 and made[0].shape == made[1].shape == (KVH, n, d)
    kept = fa.top_k_rows(q_mx, keys_t, inv, top_k, threshold, lambda: made)
    assert np.array_equal(np.array(kept[0]), np.array(rows)) and np.array_equal(np.array(kept[1]), np.array(dots))


@pytest.mark.parametrize("scale", [1e-3, 300.0, 1e-6, 1e4], ids=["small", "large", "subnormal", "large_norm"])
def test_float16_queries_of_any_norm(scale, mma):
    """Float16 queries go in as they are: the bound scales with each row's |q|, whatever it is
    (subnormal components; norms near 1e5, whose float16 matmul scores were inf on the other path)."""
    B, H, KVH, L, d, n, top_k = 1, 8, 2, 4, 64, 300, 8
    q, keys = _inputs(np.random.default_rng(7), B, H, KVH, L, d, n, "random")
    q16 = mx.array(q * np.float32(scale)).astype(mx.float16)
    keys_mx = mx.array(keys).astype(mx.float16)
    inv = mx.rsqrt(mx.maximum(mx.sum(keys_mx.astype(mx.float32) ** 2, axis=-1), 1e-24))
    rows, dots = fa.top_k_rows(q16, mx.contiguous(keys_mx.swapaxes(-1, -2)), inv, top_k, None)
    _check(
        np.array(q16.astype(mx.float32)),
        np.array(keys_mx.astype(mx.float32)),
        np.array(rows),
        np.array(dots),
        top_k,
        None,
    )
