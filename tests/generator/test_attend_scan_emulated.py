"""Breaker's cases for the one-launch decode layer (the attend kernel scanning the bank itself,
``decode_kernels.ATTEND_SCAN``) on the emulator: exact ties across the block's warps, banks of
fewer rows than the block's warps or lanes, row counts that are not a multiple of the run (VEC
false), 2-byte banks read in runs of 8 rows, k = 1 and k = 32 (256 candidates), a threshold that
masks every memory, GQA groups, head sizes 24 / 80 / 128 / 256, half-precision banks, L > 1 and
B > 1, and the largest bank that takes this path (SCAN_IN_ATTEND rows). Each against the float64
top-k (tie-aware) and attention, and (inputs without ties) against the two-kernel path exactly."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from services.generator import fused_attention as fa

from . import cuda_emulator
from .np_reference import attend_over_picks
from .test_kernels_emulated import _check, _inputs, emulated  # noqa: F401 - the fixture

pytestmark = pytest.mark.skipif(cuda_emulator.CXX is None, reason="the emulator needs a C++ compiler")

CASES = {
    # name: (B, H, KVH, L, S, d, n, top_k, threshold, mask, bank dtype, input mode)
    "ties_across_warps_k9": (1, 4, 2, 1, 7, 16, 600, 9, None, "none", mx.float32, "ties"),
    "ties_k32_256_candidates": (1, 2, 1, 1, 5, 16, 300, 32, None, "none", mx.float32, "ties"),
    "zeros_threshold_zero_causal_l2": (1, 4, 2, 2, 6, 24, 101, 8, 0.0, "causal", mx.float16, "zeros"),
    "five_rows_k32": (2, 4, 2, 1, 3, 80, 5, 32, None, "none", mx.bfloat16, "random"),
    "rows_not_a_multiple_of_four_k1": (1, 7, 1, 1, 9, 24, 1023, 1, None, "none", mx.float32, "random"),
    "head_dim_256_k32_gqa4": (1, 8, 2, 1, 4, 256, 259, 32, None, "causal", mx.bfloat16, "random"),
    "threshold_masks_all_b2_l3": (2, 4, 2, 3, 8, 32, 200, 4, 0.999, "causal", mx.float32, "random"),
    "near_ties_float16": (1, 4, 1, 1, 4, 64, 777, 16, None, "none", mx.float16, "near"),
    "largest_bank_in_one_launch": (1, 2, 1, 1, 3, 16, fa.SCAN_IN_ATTEND, 8, None, "none", mx.float32, "random"),
    # 2-byte banks of a multiple of 8 rows: runs of 8 (16-byte loads), the unrolled column loop
    "runs_of_8_float16_causal": (1, 4, 2, 1, 6, 64, 1024, 10, None, "causal", mx.float16, "random"),
    "runs_of_8_bfloat16_ties_d128": (1, 8, 2, 1, 5, 128, 776, 16, None, "none", mx.bfloat16, "ties"),
    "runs_of_8_float16_d24_b2_l2": (2, 4, 1, 2, 7, 24, 64, 5, 0.0, "causal", mx.float16, "near"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_attend_scan_takes_the_exact_top_k_and_attends(case, emulated, monkeypatch):  # noqa: F811
    B, H, KVH, L, S, d, n, top_k, threshold, mask_kind, bank_dtype, mode = CASES[case]
    assert n <= fa.SCAN_IN_ATTEND and B * H * L < fa.MATMUL_ROWS
    kernels = []
    monkeypatch.setattr(
        mx.fast, "cuda_kernel", lambda name, *a, **kw: kernels.append(name) or cuda_emulator.cuda_kernel(name, *a, **kw)
    )
    rng = np.random.default_rng(100 + sorted(CASES).index(case))
    q, keys = _inputs(rng, B, H, KVH, L, d, n, mode)
    keys_mx = mx.array(keys).astype(bank_dtype)
    values_mx = mx.array(rng.standard_normal((KVH, n, d)).astype(np.float32)).astype(bank_dtype)
    keys, values = (np.array(a.astype(mx.float32)) for a in (keys_mx, values_mx))
    k_mx = mx.array(rng.standard_normal((B, KVH, S, d)).astype(np.float32) * 0.3)
    v_mx = mx.array(rng.standard_normal((B, KVH, S, d)).astype(np.float32))
    allowed = np.ones((B, L, S), bool)
    mask = None
    if mask_kind == "causal":
        allowed = np.arange(S)[None, None, :] <= (S - L + np.arange(L))[None, :, None]
        allowed = np.broadcast_to(allowed, (B, L, S))
        mask = "causal"
    kernel_mask = fa.mask_mode(mask, B, L, S)
    keys_t = mx.contiguous(keys_mx.swapaxes(-1, -2))
    inv = mx.rsqrt(mx.maximum(mx.sum(keys_mx.astype(mx.float32) ** 2, axis=-1), 1e-24))
    out, mass, rows, dots = fa.attend_top_k(
        mx.array(q), k_mx, v_mx, kernel_mask, keys_t, inv, values_mx, top_k, threshold, 0.125, mx.float32
    )
    assert len(kernels) == 1 and kernels[0].startswith("extmind_attend_scan_")  # + its template (kernel_name)
    rows, dots = np.array(rows), np.array(dots)
    _check(q, keys, rows, dots, top_k, threshold)
    if mode == "random":
        want_rows, want_dots = fa.top_k_rows(mx.array(q), keys_t, inv, top_k, threshold)
        np.testing.assert_array_equal(rows, np.array(want_rows))
        np.testing.assert_array_equal(dots, np.array(want_dots))
    if threshold == 0.999:
        assert (rows == -1).all() and float(np.array(mass).max()) == 0.0
    want, want_mass = attend_over_picks(q, np.array(k_mx), np.array(v_mx), allowed, rows, dots, values, 0.125)
    np.testing.assert_allclose(np.array(out), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(mass), want_mass, rtol=1e-4, atol=1e-6)


def test_the_banks_the_one_launch_kernel_reads_in_place_are_row_contiguous():
    """The attend kernel is made with ensure_row_contiguous=False (it reads the KV cache with its
    strides) but indexes keys_t, inv_norms and the values as row-contiguous arrays; the scan
    kernel of the two-launch path gets copies from MLX instead. So what LocalRetriever.layer_bank
    hands the fused path must be row-contiguous: one bank (also one stored in another memory
    layout), banks of one dtype, banks of two."""
    from extmind import tensor
    from services.generator.bank_cache import LocalRetriever, bank_from_numpy

    from .test_kernels_emulated import _row_contiguous

    rng = np.random.default_rng(0)

    def bank(name, n, dtype):
        arrays = [rng.standard_normal((2, n, 16)).astype(np.float16 if dtype == tensor.FLOAT16 else np.float32)]
        return bank_from_numpy(name, "v1", arrays, [a.copy() for a in arrays], dtype)

    def column_major_bank(name, n):  # storage arrays laid out [n, KVH, d] in memory (fancy indexing)
        arrays = [rng.standard_normal((n, 2, 16)).astype(np.float32).transpose(1, 0, 2)]
        assert not arrays[0].flags["C_CONTIGUOUS"]
        return bank_from_numpy(name, "v1", arrays, [a.copy(order="K") for a in arrays], tensor.FLOAT32)

    for banks in (
        [column_major_bank("c", 9)],
        [bank("a", 7, tensor.FLOAT32)],
        [bank("a", 7, tensor.FLOAT16), bank("b", 5, tensor.FLOAT16)],
        [bank("a", 7, tensor.FLOAT32), bank("b", 5, tensor.FLOAT16)],
    ):
        keys_t, inv_norms, values = LocalRetriever(banks).layer_bank(0)
        assert keys_t.shape == (2, 16, sum(b.rows for b in banks))
        assert all(_row_contiguous(a) for a in (keys_t, inv_norms, values))


@pytest.mark.parametrize("form", ["ROWS", "MERGE", "SCAN"])
def test_the_attend_kernels_static_shared_memory_fits_the_room_max_local_positions_leaves(form):
    """max_local_positions gives the logits all of a block's shared memory but 16 KiB, which the
    attend kernel's static arrays must fit in: checked for each form at its largest (head size
    256, lists of 32), from the sources' own declarations."""
    import re

    from services.generator import decode_kernels as dk

    source = dk.ATTEND_HEAD + getattr(dk, f"ATTEND_{form}") + dk.ATTEND_LOGITS_WARP + dk.ATTEND_TAIL
    values = {"D": fa.MAX_HEAD_DIM, "T": fa._ATTEND_THREADS, "W": fa._ATTEND_THREADS // 32, "KL": fa.MAX_TOP_K}
    total = 0
    found = re.findall(r"__shared__\s+(float|int)\s+\w+((?:\[[^\]]+\])+);", source)
    assert found
    for _typ, dims in found:
        n = 1
        for expr in re.findall(r"\[([^\]]+)\]", dims):
            n *= eval(expr, {}, dict(values))  # noqa: S307 - the kernel's own constant expressions
        total += 4 * n
    assert total <= 16 * 1024, total
