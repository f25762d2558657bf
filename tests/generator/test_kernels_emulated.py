"""The decode top-k and attend kernels (fused_attention's sources and kernel_parts.TOPK_HEADER)
run as written on the CPU (cuda_emulator.py: every thread a coroutine,
warp shuffles exchanged among the 32 lanes), through ``fused_attention.top_k_rows`` itself, so
that its grid, head tiles and chunking are the ones the GPU gets. Each case is checked against an
exact float64 cosine top-k, tie-aware: inputs with many exactly tied rows, chunks holding fewer
rows than k or none, fewer rows than lanes, GQA groups of 1, 4, 7 and 8, thresholds, B and L > 1.
``attend_top_k`` (the attend kernel merging the scan's candidates itself) is checked against the
same top-k and the float64 attention over the rows it picked. device_stack's kernel runs the same
way against mx.stack. test_fused_attention.py and
test_device_stack.py check the same on CUDA; this runs on any machine with a C++ compiler."""

from __future__ import annotations

import functools
import sys

import mlx.core as mx
import numpy as np
import pytest

from services.generator import decode_kernels as dk
from services.generator import device_stack, host_staging, prefill_attention, prefill_top_k
from services.generator import fused_attention as fa

from . import cuda_emulator
from .np_reference import attend_over_picks

pytestmark = pytest.mark.skipif(
    cuda_emulator.CXX is None or sys.platform != "linux", reason="the emulator needs a C++ compiler and glibc ucontext"
)
SLACK = 1e-5  # cosines this close may be ordered either way by float32 rounding


@pytest.fixture
def emulated(monkeypatch):
    """``mx.fast.cuda_kernel`` replaced by the emulator for the duration of a test."""
    monkeypatch.setattr(mx.fast, "cuda_kernel", cuda_emulator.cuda_kernel)
    # A fresh memo of the scan's launches: tests change chunks_for.
    monkeypatch.setattr(fa, "_scan_call", functools.lru_cache(maxsize=None)(fa._scan_call.__wrapped__))
    kernels = (dk.topk_scan_kernel, dk.topk_merge_kernel, dk.attend_kernel, prefill_top_k._kernel)
    kernels += (host_staging._to_host_kernel, host_staging._from_host_kernel)
    kernels += (fa._attend_call, fa._scan_attend_call)  # their launches hold kernel objects
    for k in kernels:
        k.cache_clear()
    yield
    for k in kernels:
        k.cache_clear()


def _inputs(rng, B, H, KVH, L, d, n, mode):
    keys = rng.standard_normal((KVH, n, d))
    q = rng.standard_normal((B, H, L, d))
    if mode == "ties":  # every row one of three directions, at three lengths: exact ties everywhere
        base = rng.standard_normal((KVH, 3, d))
        keys = base[:, rng.integers(0, 3, n)] * 2.0 ** rng.integers(-1, 2, (1, n, 1))
    elif mode == "zeros":  # zero keys (cosine 0) among the rows; zero queries (every cosine 0)
        keys[:, ::3] = 0
        q[:, ::2] = 0
    elif mode == "near":  # every row and query within ~1e-4 of one direction: cosines closer than
        # the prefill kernel's bound, so many candidates, ranked by their exact cosines only
        base = rng.standard_normal(d)
        keys = base + 0.01 * rng.standard_normal((KVH, n, d))
        q = base + 0.003 * rng.standard_normal((B, H, L, d))
    elif mode.startswith("group_"):  # group_<c>: c rows scattered over the bank within ~1e-3 of the
        # queries' cosine 1 (gaps between them well past SLACK), the rest random (cosines below
        # 0.9): the prefill kernel's candidates are those c rows (when k <= the lanes holding one)
        c = int(mode.removeprefix("group_"))
        base = rng.standard_normal(d)
        keys[:, rng.choice(n, c, replace=False)] = base + 0.03 * rng.standard_normal((KVH, c, d))
        q = base + 0.01 * rng.standard_normal((B, H, L, d))
    # Row-major, as the service's banks are (kv_dtypes.from_storage): the ties' fancy indexing lays
    # keys out as [n, KVH, d] in memory, and MLX's CUDA reductions keep an input's layout, so the
    # tests' inverse norms came out column-major there, which the one-launch kernel (reading its
    # bank in place, row-contiguous by contract) read as other rows' norms.
    return np.ascontiguousarray(q, np.float32), np.ascontiguousarray(keys, np.float32)


def _row_contiguous(a: mx.array) -> bool:
    """Whether MLX holds ``a`` row-contiguous (its buffer's strides, through the buffer protocol)."""
    return bool(np.asarray(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a).flags["C_CONTIGUOUS"])


def _check(q, keys, rows, dots, top_k, threshold):
    """rows / dots from top_k_rows against the exact cosines of q [B, H, L, d], keys [KVH, N, d]."""
    B, H, L, _ = q.shape
    k = min(top_k, keys.shape[1])
    assert rows.shape == dots.shape == (B, H, L, k) and rows.dtype == np.int32
    kg = np.repeat(keys.astype(np.float64), H // keys.shape[0], axis=0)
    q64 = q.astype(np.float64)
    raw = np.einsum("bhld,hnd->bhln", q64, kg)
    qn = np.sqrt(np.maximum((q64 * q64).sum(-1, keepdims=True), 1e-24))
    kn = np.sqrt(np.maximum((kg * kg).sum(-1), 1e-24))[None, :, None, :]
    cos = raw / qn / kn
    kth = -np.sort(-cos, axis=-1)[..., k - 1]
    for idx in np.ndindex(B, H, L):
        got, c = rows[idx], cos[idx]
        assert ((got >= -1) & (got < keys.shape[1])).all(), (idx, got)  # no unwritten or stray entry
        picked = got[got >= 0]
        if threshold is None:
            assert len(picked) == k, (idx, got)
        else:
            best = -np.sort(-c)[:k]
            assert len(picked) >= (best > threshold + SLACK).sum(), (idx, got, best)
            assert k - len(picked) >= (best <= threshold - SLACK).sum(), (idx, got, best)
            assert (got[len(picked) :] == -1).all(), (idx, got)  # the reported rows first
            assert (c[picked] > threshold - SLACK).all()
        assert len(set(picked.tolist())) == len(picked), (idx, got)
        assert (c[picked] >= kth[idx] - SLACK).all(), (idx, got, c[picked], kth[idx])  # tie-aware top-k
        assert (np.diff(c[picked]) <= SLACK).all(), (idx, got, c[picked])  # descending
        np.testing.assert_allclose(dots[idx][: len(picked)], raw[idx][picked], rtol=1e-4, atol=1e-4)


CASES = {
    # name: (B, H, KVH, L, d, n, top_k, threshold, keys dtype, mode, chunks (None: chunks_for's))
    "gqa4_chunked_by_chunks_for": (2, 8, 2, 3, 64, 1000, 10, None, mx.float32, "random", None),
    "gqa8_tile8_float16": (1, 16, 2, 1, 80, 3000, 8, None, mx.float16, "random", None),
    "gqa7_odd_group": (2, 14, 2, 1, 64, 700, 8, None, mx.float32, "random", None),
    "mha_k32_bfloat16": (1, 4, 4, 2, 128, 600, 32, None, mx.bfloat16, "random", None),
    "fewer_rows_than_lanes": (2, 8, 2, 2, 24, 5, 10, None, mx.float32, "random", None),
    "one_row": (1, 8, 2, 1, 16, 1, 3, None, mx.float32, "random", None),
    "ties_everywhere_one_chunk": (2, 8, 2, 2, 16, 200, 9, None, mx.float32, "ties", 1),
    "ties_across_chunks": (1, 8, 2, 1, 16, 1000, 17, None, mx.float32, "ties", 6),
    "ties_and_threshold": (1, 8, 2, 2, 16, 300, 8, 0.0, mx.float16, "ties", 3),
    "chunks_fewer_rows_than_k": (1, 8, 2, 1, 64, 40, 8, None, mx.float32, "random", 8),
    "empty_chunks": (1, 8, 2, 1, 64, 10, 4, None, mx.float32, "random", 13),
    "threshold_over_chunks": (2, 8, 2, 1, 64, 3000, 8, 0.1, mx.float32, "random", None),
    "zero_keys_and_queries": (1, 8, 2, 2, 256, 300, 16, None, mx.float32, "zeros", 2),
    "zero_queries_threshold_zero": (1, 8, 2, 1, 64, 100, 8, 0.0, mx.float32, "zeros", None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_decode_top_k_kernels_are_the_exact_top_k(case, emulated, monkeypatch):
    B, H, KVH, L, d, n, top_k, threshold, dtype, mode, chunks = CASES[case]
    assert B * H * L < fa.MATMUL_ROWS  # the decode kernels, not prefill_top_k
    if chunks is not None:
        monkeypatch.setattr(fa, "chunks_for", lambda tiles, n, k: chunks)
    q, keys = _inputs(np.random.default_rng(sorted(CASES).index(case)), B, H, KVH, L, d, n, mode)
    keys_mx = mx.array(keys).astype(dtype)
    keys = np.array(keys_mx.astype(mx.float32))  # what the kernel sees
    inv = mx.rsqrt(mx.maximum(mx.sum(keys_mx.astype(mx.float32) ** 2, axis=-1), 1e-24))
    rows, dots = fa.top_k_rows(mx.array(q), mx.contiguous(keys_mx.swapaxes(-1, -2)), inv, top_k, threshold)
    _check(q, keys, np.array(rows), np.array(dots), top_k, threshold)


PREFILL_CASES = {
    # name: (B, H, KVH, L, d, n, top_k, threshold, keys dtype, mode); n % 8 != 0 takes the
    # row-at-a-time loops, n % 8 == 0 the 16-byte loads
    "random_float32_vector_loads": (1, 8, 2, 6, 64, 512, 10, None, mx.float32, "random"),
    "random_float16_rows_one_at_a_time": (1, 8, 2, 5, 80, 301, 8, None, mx.float16, "random"),
    "ties_and_threshold": (2, 4, 2, 4, 16, 256, 9, 0.0, mx.float32, "ties"),
    "fewer_rows_than_k_list": (1, 8, 8, 4, 32, 20, 20, None, mx.float32, "random"),
    "head_dim_20_keys_read_one_at_a_time": (1, 8, 2, 5, 20, 300, 7, None, mx.float16, "random"),
    # float32 scores (4 per load) of a row count that is not a multiple of 4; bfloat16 keys of head
    # size 24 in 16-byte loads (8 per load)
    "bfloat16_head_dim_24_float32_scores_rows_one_at_a_time": (1, 8, 2, 5, 24, 301, 8, None, mx.bfloat16, "random"),
    "float32_head_dim_96_vector_loads": (1, 8, 2, 4, 96, 512, 10, None, mx.float32, "random"),
    "float16_head_dim_256_k32": (1, 4, 1, 4, 256, 1000, 32, None, mx.float16, "random"),
    # float32 scores in 16-byte loads past prefill_top_k.HELD_BYTES a row: read twice, none held
    "float32_vector_loads_not_held": (1, 4, 2, 4, 32, 2052, 10, None, mx.float32, "random"),
    "near_ties_float16": (1, 8, 2, 4, 64, 800, 16, None, mx.float16, "near"),
    "near_ties_bfloat16_head_dim_24": (1, 8, 2, 4, 24, 803, 16, None, mx.bfloat16, "near"),
}


@pytest.mark.parametrize("case", sorted(PREFILL_CASES))
def test_prefill_top_k_kernel_is_the_exact_top_k(case, emulated, monkeypatch):
    """prefill_top_k's kernel (approximate scores, a bound, exact re-ranking), reached through
    top_k_rows with MATMUL_ROWS lowered so that these small batches count as a prefill."""
    _prefill_case(PREFILL_CASES[case], sorted(PREFILL_CASES).index(case), monkeypatch)


# name: PREFILL_CASES' fields. The candidates in a group of c rows (mode group_<c>): gathered 32 at
# a time across runs of rows (32 * V: V = 8 float16 scores, 4 float32), the rest moved to the front
# of the list and then more appended; 31 take the one sort across the warp, 32 exactly one group.
GROUP_CASES = {
    "31_candidates_one_sort_float16_rows_one_at_a_time": (1, 8, 2, 2, 32, 601, 8, None, mx.float16, "group_31"),
    "32_candidates_one_group_float32_vector_loads": (1, 8, 2, 2, 32, 1000, 16, None, mx.float32, "group_32"),
    "40_candidates_over_eight_runs_float32_threshold": (1, 8, 2, 2, 32, 1000, 16, 0.9996, mx.float32, "group_40"),
    "40_candidates_bfloat16_rows_one_at_a_time": (1, 8, 2, 2, 24, 515, 16, None, mx.bfloat16, "group_40"),
}


@pytest.mark.parametrize("case", sorted(GROUP_CASES))
def test_prefill_top_k_kernel_ranks_a_group_of_candidates_across_runs(case, emulated, monkeypatch):
    """Near 32 candidates in all, scattered over the bank: the warp's list of them in shared memory
    flushed 32 at a time, its rest kept for the next runs (or the one sort when under 32)."""
    B, H, KVH, L, d, n, top_k, threshold, dtype, mode = GROUP_CASES[case]
    q, keys = _inputs(np.random.default_rng(sorted(GROUP_CASES).index(case)), B, H, KVH, L, d, n, mode)
    qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
    cos = np.einsum("bhld,hnd->bhln", qn, np.repeat(keys / np.linalg.norm(keys, axis=-1, keepdims=True), H // KVH, 0))
    c = int(mode.removeprefix("group_"))
    assert ((cos > 0.99).sum(-1) == c).all() and (np.sort(cos, -1)[..., -c - 1] < 0.9).all()  # the group apart
    _prefill_case(GROUP_CASES[case], sorted(GROUP_CASES).index(case), monkeypatch)


def _prefill_case(case, seed, monkeypatch):
    B, H, KVH, L, d, n, top_k, threshold, dtype, mode = case
    monkeypatch.setattr(fa, "MATMUL_ROWS", 16)
    assert B * H * L >= fa.MATMUL_ROWS
    q, keys = _inputs(np.random.default_rng(seed), B, H, KVH, L, d, n, mode)
    keys_mx = mx.array(keys).astype(dtype)
    keys = np.array(keys_mx.astype(mx.float32))
    inv = mx.rsqrt(mx.maximum(mx.sum(keys_mx.astype(mx.float32) ** 2, axis=-1), 1e-24))
    keys_t = mx.contiguous(keys_mx.swapaxes(-1, -2))
    rows, dots = fa.top_k_rows(mx.array(q), keys_t, inv, top_k, threshold)
    _check(q, keys, np.array(rows), np.array(dots), top_k, threshold)
    # The same from the unit and row-major keys a cached bank keeps (bank_cache.Bank.prefill_keys).
    made = prefill_top_k.prefill_keys(keys_t, inv)
    kept = fa.top_k_rows(mx.array(q), keys_t, inv, top_k, threshold, lambda: made)
    assert np.array_equal(np.array(kept[0]), np.array(rows)) and np.array_equal(np.array(kept[1]), np.array(dots))
    # Scores held in shared memory between the bound and the candidates, or read twice; float16
    # scores screened by packed maxima or one by one: the same.
    _same_without(monkeypatch, (mx.array(q), keys_t, inv, top_k, threshold), rows, dots)


def _same_without(monkeypatch, args, rows, dots):
    """top_k_rows(*args) with only a row's first 1 KiB of scores held (HELD_BYTES), then none
    (HOLD_SCORES off), then also PACK_SCORES off, gives ``rows`` and ``dots`` exactly."""
    for flag, value in (("HELD_BYTES", 1024), ("HOLD_SCORES", False), ("PACK_SCORES", False)):
        monkeypatch.setattr(prefill_top_k, flag, value)
        again = fa.top_k_rows(*args)
        assert np.array_equal(np.array(again[0]), np.array(rows)), flag
        assert np.array_equal(np.array(again[1]), np.array(dots)), flag


@pytest.mark.parametrize(
    "n, dtype, held",
    [
        (4096, mx.float16, True),
        (4104, mx.float16, True),
        (65536, mx.float16, True),
        (2052, mx.float32, True),
        (301, mx.float16, False),
        (512, mx.float32, True),
    ],
)
def test_prefill_top_k_holds_the_first_bytes_of_each_row_of_scores(n, dtype, held, monkeypatch):
    """Rows of scores in 16-byte loads hold their first HELD_BYTES (a longer row reads the rest
    twice); unaligned rows hold none (read twice); HOLD_SCORES off holds none."""
    approx = mx.zeros((2, 3, n), dtype=dtype)
    assert prefill_top_k._holds(approx) is held
    monkeypatch.setattr(prefill_top_k, "HOLD_SCORES", False)
    assert prefill_top_k._holds(approx) is False


# name: (B, H, KVH, L, d, n, top_k, threshold, mode): float16 queries with a float16 bank, which
# the matmul takes as they are (the kernel scales its bound by each row's |q|: prefill_top_k.py)
RAW_HALF_CASES = {
    "random_vector_loads": (1, 8, 2, 6, 64, 512, 10, None, "random"),
    "random_rows_one_at_a_time_threshold": (1, 8, 2, 5, 80, 301, 8, 0.05, "random"),
    "near_ties": (1, 8, 2, 4, 64, 800, 16, None, "near"),
    "zero_queries_and_keys": (2, 4, 2, 4, 32, 256, 9, None, "zeros"),
    "ties_k32_head_dim_256": (1, 4, 1, 4, 256, 1000, 32, 0.0, "ties"),
}


@pytest.mark.parametrize("case", sorted(RAW_HALF_CASES))
@pytest.mark.parametrize(
    "scale",
    [1.0, 1e-3, 300.0, 1e-6, 1e4],
    # subnormal: every component a float16 subnormal (a few bits each, scores subnormal); overflowing:
    # |q| near 1e5, so near rows' float16 scores are inf (candidates, ranked by their exact cosines)
    ids=["unit_size", "small", "large", "subnormal", "overflowing"],
)
def test_prefill_top_k_kernel_ranks_float16_queries_as_they_are(case, scale, emulated, monkeypatch):
    """Queries in the bank's float16 go into the matmul unnormalized: the picks are the exact top-k
    of those float16 queries, whatever their norm."""
    B, H, KVH, L, d, n, top_k, threshold, mode = RAW_HALF_CASES[case]
    monkeypatch.setattr(fa, "MATMUL_ROWS", 16)
    q, keys = _inputs(np.random.default_rng(sorted(RAW_HALF_CASES).index(case)), B, H, KVH, L, d, n, mode)
    q16 = mx.array(q * np.float32(scale)).astype(mx.float16)
    keys_mx = mx.array(keys).astype(mx.float16)
    inv = mx.rsqrt(mx.maximum(mx.sum(keys_mx.astype(mx.float32) ** 2, axis=-1), 1e-24))
    args = (q16, mx.contiguous(keys_mx.swapaxes(-1, -2)), inv, top_k, threshold)
    rows, dots = fa.top_k_rows(*args)
    q_seen, keys_seen = np.array(q16.astype(mx.float32)), np.array(keys_mx.astype(mx.float32))
    _check(q_seen, keys_seen, np.array(rows), np.array(dots), top_k, threshold)
    _same_without(monkeypatch, args, rows, dots)


@pytest.mark.parametrize("n", [33, 300, 264, 512])
@pytest.mark.parametrize("errors", ["against_the_top_k", "random_signs"])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_prefill_top_k_kernel_keeps_the_top_k_whatever_scores_within_its_bound(n, errors, dtype, emulated, monkeypatch):
    """The kernel's rule given approximate scores off by just under their bound each (whatever the
    matmul did within it; queries and bank of one dtype: the raw scores |q| c_n, bound APPROX_E *
    |q|; float16 scores are rounded after the error, so theirs is 0.99 of the bound less the
    rounding's 2^-11): the exact top-k rows scored too low and every other row too high, or each
    off either way: it still returns the exact top-k (and misses it with errors past the bound:
    the check has teeth). Float16 scores of n % 8 == 0 rows take the packed screen (PACK)."""
    monkeypatch.setattr(fa, "MATMUL_ROWS", 16)
    B, H, KVH, L, d, top_k = 1, 8, 2, 4, 32, 8
    rng = np.random.default_rng(n)
    q, keys = _inputs(rng, B, H, KVH, L, d, n, "near")
    keys_mx = mx.array(keys).astype(dtype)
    q_mx = mx.array(q).astype(dtype)
    q, keys = np.array(q_mx.astype(mx.float32)), np.array(keys_mx.astype(mx.float32))
    inv = mx.rsqrt(mx.maximum(mx.sum(keys_mx.astype(mx.float32) ** 2, axis=-1), 1e-24))
    kernel = prefill_top_k._kernel()
    bound = prefill_top_k.APPROX_E if dtype == mx.float32 else 0.99 * (prefill_top_k.APPROX_E - 2.0**-11)
    np_dtype = np.float32 if dtype == mx.float32 else np.float16

    def with_errors(scale):
        def call(inputs, **kw):
            qm = q.astype(np.float64).reshape(B, KVH, H // KVH, L, d).transpose(1, 0, 2, 3, 4).reshape(KVH, -1, d)
            k64 = keys.astype(np.float64)
            cos = np.einsum("gmd,gnd->gmn", qm, k64)
            cos /= np.linalg.norm(qm, axis=-1)[..., None] * np.linalg.norm(k64, axis=-1)[:, None, :]
            top = cos >= -np.sort(-cos, axis=-1)[..., top_k - 1 : top_k]
            sign = np.where(top, -1.0, 1.0) if errors == "against_the_top_k" else rng.choice([-1.0, 1.0], cos.shape)
            qn = np.linalg.norm(qm, axis=-1)[..., None]  # raw queries: scores and bound times |q|
            approx = mx.array((qn * (cos + sign * scale * bound)).astype(np_dtype))
            return kernel(inputs=[inputs[0], approx, *inputs[2:]], **kw)

        return call

    args = (q_mx, mx.contiguous(keys_mx.swapaxes(-1, -2)), inv, top_k, None)
    monkeypatch.setattr(prefill_top_k, "_kernel", lambda: with_errors(0.999))
    rows, dots = fa.top_k_rows(*args)
    _check(q, keys, np.array(rows), np.array(dots), top_k, None)
    if errors == "against_the_top_k" and n in (33, 512):
        monkeypatch.setattr(prefill_top_k, "_kernel", lambda: with_errors(1.5 * prefill_top_k.APPROX_E / bound))
        rows, dots = fa.top_k_rows(*args)
        with pytest.raises(AssertionError):
            _check(q, keys, np.array(rows), np.array(dots), top_k, None)


@pytest.mark.parametrize("edge", ["at_the_bound", "-inf", "nan"])
def test_prefill_top_k_packed_screen_passes_over_no_candidate(edge, emulated, monkeypatch):
    """The packed screen (PACK) passes over a lane's load of 8 float16 scores only when none of
    them is a candidate: here row 0, the exact top-1, is scored alone in its load at exactly the
    candidates' edge (a + E == cut), or as -inf or NaN (candidates by the rule), and row 200 (in
    another lane's load) makes the cut. A screen that passed over one score more (a threshold one
    float16 step past the edge, NaN or -inf taken for quiet) picks row 200."""
    monkeypatch.setattr(fa, "MATMUL_ROWS", 16)
    B, H, KVH, L, d, n = 1, 1, 1, 16, 16, 256
    q = np.zeros((B, H, L, d), np.float32)
    q[..., 0] = 1.0  # float32 queries, float16 bank: unit queries, bound E = APPROX_E (not raw)
    keys = np.zeros((KVH, n, d), np.float32)
    keys[0, :, 2] = 1.0  # cosine 0
    keys[0, 0] = np.eye(d)[0]  # cosine 1: the top-1
    keys[0, 200, :2] = 1.0  # cosine 0.707
    keys_mx = mx.array(keys).astype(mx.float16)
    inv = mx.rsqrt(mx.maximum(mx.sum(keys_mx.astype(mx.float32) ** 2, axis=-1), 1e-24))
    u = 2.0**-12  # float16's step in [0.25, 0.5): E is 6.5 of them
    assert prefill_top_k.APPROX_E == 6.5 * u
    approx = np.full((KVH, B * H * L, n), 0.25, np.float32)
    approx[..., 200] = 0.25 + 100 * u  # its lane's bound 0.25 + 93.5 u: the cut (top_k 1)
    approx[..., 0] = {"at_the_bound": 0.25 + 87 * u, "-inf": -np.inf, "nan": np.nan}[edge]
    kernel = prefill_top_k._kernel()
    monkeypatch.setattr(
        prefill_top_k,
        "_kernel",
        lambda: lambda inputs, **kw: kernel(inputs=[inputs[0], mx.array(approx).astype(mx.float16), *inputs[2:]], **kw),
    )
    args = (mx.array(q), mx.contiguous(keys_mx.swapaxes(-1, -2)), inv, 1, None)
    rows, dots = fa.top_k_rows(*args)
    assert (np.array(rows) == 0).all()
    _check(q, np.array(keys_mx.astype(mx.float32)), np.array(rows), np.array(dots), 1, None)
    _same_without(monkeypatch, args, rows, dots)


@functools.cache
def _finite_halves() -> np.ndarray:
    """Every finite float16 value, ascending, as float32 (one zero)."""
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
    return np.unique(halves[np.isfinite(halves)])


def _edge_score(cut: np.float32, e: np.float32) -> np.float32:
    """The smallest float16 score a that the candidates' rule keeps for ``cut`` (not
    fl32(a + E) < cut): the exact edge, in float32 arithmetic as the kernel does it."""
    halves = _finite_halves()
    return halves[~((halves + e).astype(np.float32) < cut)].min()


def test_prefill_top_k_packed_screen_keeps_the_edge_at_every_scale(emulated, monkeypatch):
    """The packed screen against the candidates' exact edge over cuts of every scale and sign
    (subnormal to 65 504): each query row has its own cut (set by row 200's score), and the exact
    top-1 (row 0, alone in its load amid far lower scores) is scored at the smallest float16 the
    rule keeps: it must be picked; one float16 step lower it is no candidate, and row 200 is.
    A screen a few hundredths of E looser than the rule's edge skips row 0 at small cuts (where
    float16 steps are finer than that), which one score level alone would not show."""
    monkeypatch.setattr(fa, "MATMUL_ROWS", 16)
    e = np.float32(prefill_top_k.APPROX_E)  # float32 queries, float16 bank: unit queries, bound E
    halves = _finite_halves()
    levels = halves[np.abs(halves) <= 60000][::211]
    extra = np.float16([6e-8, 2**-14, 0.0015, 0.003, -0.001, -0.04, -0.1, 65504]).astype(np.float32)
    levels = np.concatenate([levels, extra])
    cuts = (levels - e).astype(np.float32)
    edges = np.array([_edge_score(c, e) for c in cuts], np.float32)
    B, H, KVH, d, n = 1, 1, 1, 16, 256
    L = len(levels)
    q = np.zeros((B, H, L, d), np.float32)
    q[..., 0] = 1.0
    keys = np.zeros((KVH, n, d), np.float32)
    keys[0, :, 2] = 1.0  # cosine 0
    keys[0, 0] = np.eye(d)[0]  # cosine 1: the top-1 wherever it is a candidate
    keys[0, 200, :2] = 1.0  # cosine 0.707
    keys_mx = mx.array(keys).astype(mx.float16)
    inv = mx.rsqrt(mx.maximum(mx.sum(keys_mx.astype(mx.float32) ** 2, axis=-1), 1e-24))
    kernel = prefill_top_k._kernel()
    args = (mx.array(q), mx.contiguous(keys_mx.swapaxes(-1, -2)), inv, 1, None)
    for row_0, want in ((edges, 0), (np.nextafter(edges.astype(np.float16), np.float16(-np.inf)), 200)):
        approx = np.full((KVH, L, n), -65504.0, np.float32)
        approx[0, :, 200] = levels
        approx[0, :, 0] = row_0
        scores = mx.array(approx).astype(mx.float16)
        assert np.array_equal(np.array(scores.astype(mx.float32)), approx)  # every score a float16
        monkeypatch.setattr(
            prefill_top_k,
            "_kernel",
            lambda scores=scores: lambda inputs, **kw: kernel(inputs=[inputs[0], scores, *inputs[2:]], **kw),
        )
        for packed in (True, False):
            monkeypatch.setattr(prefill_top_k, "PACK_SCORES", packed)
            rows, _ = fa.top_k_rows(*args)
            wrong = np.nonzero(np.array(rows)[0, 0, :, 0] != want)[0]
            assert len(wrong) == 0, (packed, want, levels[wrong][:5], row_0[wrong][:5])


ATTEND_CASES = {
    # name: (B, H, KVH, L, S, d, n, top_k, threshold, mask, KV cache dtype, chunks (None: chunks_for's),
    # bank dtype (keys and values), KV cache as a slice of a longer buffer (strided, as mlx-lm's))
    "decode_unmasked_chunked": (2, 8, 2, 1, 40, 64, 1000, 10, None, "none", mx.float32, None, mx.float32, False),
    "decode_padded_float16": (2, 8, 2, 1, 37, 64, 700, 8, None, "array", mx.float16, None, mx.float32, False),
    "causal_three_tokens_threshold": (1, 8, 2, 3, 20, 32, 300, 6, 0.05, "causal", mx.float32, 3, mx.float32, False),
    "fewer_rows_than_k_one_chunk": (1, 4, 4, 1, 9, 16, 5, 10, None, "none", mx.float32, 1, mx.float32, False),
    "k32_992_candidates": (1, 4, 1, 1, 50, 48, 2000, 32, None, "none", mx.bfloat16, 31, mx.float32, False),
    "threshold_masks_every_memory": (1, 8, 2, 1, 10, 16, 200, 4, 0.99, "none", mx.float32, 2, mx.float32, False),
    "head_dim_24_gqa3_k1_cache_slice": (2, 6, 2, 1, 33, 24, 500, 1, None, "none", mx.float16, None, mx.float32, True),
    "head_dim_256_gqa7_bfloat16": (2, 7, 1, 1, 19, 256, 300, 9, None, "array", mx.bfloat16, None, mx.bfloat16, True),
    "k_past_rows_under_a_warp_b3": (3, 4, 2, 1, 5, 80, 20, 32, None, "none", mx.float32, None, mx.float16, False),
    # row 0 padded by L + 2: its first queries see no local position, only their memories
    "padded_chunk_queries_see_nothing": (2, 4, 2, 4, 9, 48, 300, 5, None, "padded", mx.float32, 4, mx.float32, True),
    "empty_chunks_threshold_causal": (1, 8, 2, 2, 12, 16, 10, 4, 0.0, "causal", mx.float32, 13, mx.float16, False),
}


@pytest.mark.parametrize("launches", [1, 2])
@pytest.mark.parametrize("case", sorted(ATTEND_CASES))
def test_attend_top_k_merges_the_candidates_and_attends(case, launches, emulated, monkeypatch):
    """The decode layer as one kernel (the attend kernel scans the bank itself) and as two (the
    scan's candidates merged in the attend kernel): both give top_k_rows' rows and dots exactly
    (random inputs: no ties), the exact top-k (tie-aware), and the float64 attention over those
    rows and the local context (mask kinds, GQA, threshold, head sizes not a multiple of 32,
    half-precision banks, the KV cache as a strided slice, banks of fewer rows than the block's
    warps or than k); ``attend`` given those rows and dots gives the same output and mass."""
    B, H, KVH, L, S, d, n, top_k, threshold, mask_kind, kv_dtype, chunks, bank_dtype, sliced = ATTEND_CASES[case]
    monkeypatch.setattr(fa, "SCAN_IN_ATTEND", 1 << 30 if launches == 1 else 0)
    if chunks is not None:
        monkeypatch.setattr(fa, "chunks_for", lambda tiles, n, k: chunks)
    kernels = []
    monkeypatch.setattr(
        mx.fast, "cuda_kernel", lambda name, *a, **kw: kernels.append(name) or cuda_emulator.cuda_kernel(name, *a, **kw)
    )
    rng = np.random.default_rng(10 + sorted(ATTEND_CASES).index(case))
    q, keys = _inputs(rng, B, H, KVH, L, d, n, "random")
    keys_mx = mx.array(keys).astype(bank_dtype)
    values_mx = mx.array(rng.standard_normal((KVH, n, d)).astype(np.float32)).astype(bank_dtype)
    keys, values = (np.array(a.astype(mx.float32)) for a in (keys_mx, values_mx))  # what the kernels see
    room = S + 7 if sliced else S  # a cache's buffer is longer than its filled part
    k_mx = mx.array(rng.standard_normal((B, KVH, room, d)).astype(np.float32) * 0.3).astype(kv_dtype)[..., :S, :]
    v_mx = mx.array(rng.standard_normal((B, KVH, room, d)).astype(np.float32)).astype(kv_dtype)[..., :S, :]
    assert _row_contiguous(k_mx) is not sliced  # the kernel reads the slice in place
    allowed = np.ones((B, L, S), bool)
    mask = None
    if mask_kind == "causal":
        allowed = np.arange(S)[None, None, :] <= (S - L + np.arange(L))[None, :, None]
        mask = "causal"
    elif mask_kind == "array":
        allowed[0, :, :3] = False  # row 0 left-padded by 3
        mask = mx.array(allowed[:, None])
    elif mask_kind == "padded":
        allowed = np.arange(S)[None, None, :] <= (S - L + np.arange(L))[None, :, None] & allowed
        allowed[0, :, : L + 2] = False
        assert not allowed[0, 0].any()
        mask = mx.array(allowed[:, None])
    kernel_mask = fa.mask_mode(mask, B, L, S)
    keys_t = mx.contiguous(keys_mx.swapaxes(-1, -2))
    inv = mx.rsqrt(mx.maximum(mx.sum(keys_mx.astype(mx.float32) ** 2, axis=-1), 1e-24))
    out, mass, rows, dots = fa.attend_top_k(
        mx.array(q), k_mx, v_mx, kernel_mask, keys_t, inv, values_mx, top_k, threshold, 0.125, mx.float32
    )
    assert out.shape == (B, L, H * d) and out.dtype == mx.float32 and mass.shape == (B, H, L)
    want_kernels = ["extmind_attend_scan"] if launches == 1 else ["extmind_topk_chunks", "extmind_attend_top_k"]
    assert len(kernels) == len(want_kernels)
    assert all(got.startswith(want + "_") for got, want in zip(kernels, want_kernels))  # + the template
    want_rows, want_dots = fa.top_k_rows(mx.array(q), keys_t, inv, top_k, threshold)
    rows, dots = np.array(rows), np.array(dots)
    np.testing.assert_array_equal(rows, np.array(want_rows))
    np.testing.assert_array_equal(dots, np.array(want_dots))
    _check(q, keys, rows, dots, top_k, threshold)
    if threshold == 0.99:
        assert (rows == -1).all() and float(np.array(mass).max()) == 0.0
    k_np, v_np = (np.array(a.astype(mx.float32)) for a in (k_mx, v_mx))
    want, want_mass = attend_over_picks(q, k_np, v_np, allowed, rows, dots, values, 0.125)
    np.testing.assert_allclose(np.array(out), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.array(mass), want_mass, rtol=1e-4, atol=1e-6)
    # The same kernel given the rows (``attend``: a prefill-sized batch's path) computes the same.
    out2, mass2 = fa.attend(mx.array(q), k_mx, v_mx, kernel_mask, want_rows, want_dots, values_mx, 0.125, mx.float32)
    np.testing.assert_array_equal(np.array(out2), np.array(out))
    np.testing.assert_array_equal(np.array(mass2), np.array(mass))


def test_the_fused_kernels_refuse_a_top_k_or_head_size_past_their_limits():
    """k = min(top_k, N) > MAX_TOP_K or d > MAX_HEAD_DIM is a ValueError from each entry point,
    decode or prefill sized, before any kernel is made; top_k past the limit over a bank of no
    more rows than it is not (k is min(top_k, N))."""
    rng = np.random.default_rng(3)

    def args(d, n, L=1):
        keys = mx.array(rng.standard_normal((2, n, d)).astype(np.float32))
        inv = mx.rsqrt(mx.sum(keys * keys, axis=-1))
        q = mx.array(rng.standard_normal((1, 4, L, d)).astype(np.float32))
        kv = mx.zeros((1, 2, 8, d))
        return q, kv, keys, inv

    for d, n, top_k, L in ((64, 100, fa.MAX_TOP_K + 1, 1), (fa.MAX_HEAD_DIM + 8, 100, 8, 1), (64, 100, 40, 600)):
        q, kv, keys, inv = args(d, n, L)
        assert (q.shape[0] * q.shape[1] * L >= fa.MATMUL_ROWS) == (L == 600)
        keys_t = mx.contiguous(keys.swapaxes(-1, -2))
        mask = fa.mask_mode(None, 1, L, 8)
        with pytest.raises(ValueError, match="fused kernels take k <= 32 and head size <= 256"):
            fa.top_k_rows(q, keys_t, inv, top_k, None)
        with pytest.raises(ValueError, match="fused kernels take"):
            fa.attend_top_k(q, kv, kv, mask, keys_t, inv, keys, top_k, None, 0.125, mx.float32)
        rows = mx.zeros((1, 4, L, min(top_k, n)), mx.int32)
        with pytest.raises(ValueError, match="fused kernels take"):
            fa.attend(q, kv, kv, mask, rows, rows.astype(mx.float32), keys, 0.125, mx.float32)
    assert fa._scan_call(1, 4, 1, 2, 64, 20, 100, mx.float32)[2] == 20  # top_k 100 over 20 rows: k = 20


def test_the_emulation_catches_a_wrong_kernel(emulated, monkeypatch):
    """Not vacuous: round r's winner kept by lane r + 1 gives wrong rows; a warp whose lanes
    return unevenly before a shuffle is an error, not a hang."""
    q, keys = _inputs(np.random.default_rng(0), 1, 8, 2, 1, 64, 300, "random")
    args = (mx.array(q), mx.contiguous(mx.array(keys).swapaxes(-1, -2)), mx.array(1 / np.linalg.norm(keys, axis=-1)))
    header = fa.kernel_parts.TOPK_HEADER
    monkeypatch.setattr(fa.kernel_parts, "TOPK_HEADER", header.replace("if (lane == r) {", "if (lane == r + 1) {"))
    rows, dots = fa.top_k_rows(*args, 8, None)
    with pytest.raises(AssertionError):
        _check(q, keys, np.array(rows), np.array(dots), 8, None)
    monkeypatch.setattr(fa.kernel_parts, "TOPK_HEADER", header)
    dk.topk_scan_kernel.cache_clear()
    dk.topk_merge_kernel.cache_clear()
    early = "if (unit >= q_shape[0] * (H / GT) * L * C) return;"
    assert early in dk.TOPK_SCAN_SOURCE
    monkeypatch.setattr(dk, "TOPK_SCAN_SOURCE", dk.TOPK_SCAN_SOURCE.replace(early, "if (lane == 5) return;"))
    with pytest.raises(RuntimeError, match="lanes which returned never reach"):
        fa.top_k_rows(*args, 8, None)


# A body as MLX's CUDA backend builds it (mlx/backend/cuda/custom_kernel.cpp, build_kernel): a plain
# function, its template arguments constants declared at its top; ``x_shape`` a parameter only
# where the body names it and x is not 0-d.
_IF_CONSTEXPR = """
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= x_shape[0]) return;
  if constexpr (HALF) {
    out[i] = static_cast<float>(x[i].h);  // only the emulator's __half has .h: ill-formed for float
  } else {
    out[i] = 2.f * static_cast<float>(x[i]);
  }
"""


def test_the_emulator_wraps_a_kernel_body_as_mlx_does():
    """A body compiles on the CPU only if it would in MLX's wrapping: a branch that ``if constexpr``
    discards for these template arguments is still compiled (MLX's body is no template), and a
    0-d input has no ``_shape`` (MLX passes none). Before, the emulator made the body a C++
    template and passed every input's shape, so both compiled here and would fail on the GPU."""
    x = mx.arange(64, dtype=mx.float32)
    kernel = cuda_emulator.cuda_kernel("em_if_constexpr", ["x"], ["out"], _IF_CONSTEXPR)
    launch = dict(grid=(64, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(64,)], output_dtypes=[mx.float32])
    with pytest.raises(RuntimeError, match="does not compile"):
        kernel(inputs=[x], template=[("HALF", False)], **launch)
    copy = _IF_CONSTEXPR.split("if constexpr")[0] + "out[i] = x[i];"
    plain = cuda_emulator.cuda_kernel("em_plain", ["x"], ["out"], copy)
    assert mx.array_equal(plain(inputs=[x], template=[], **launch)[0], x).item()
    with pytest.raises(RuntimeError, match="does not compile"):
        plain(inputs=[mx.array(1.0)], template=[], **launch)


@pytest.mark.parametrize("dtype", [mx.float32, mx.int32, mx.bool_, mx.float16, mx.bfloat16])
def test_device_stack_kernel_is_mx_stack(dtype, monkeypatch):
    """device_stack's kernel, its dims a padded kernel_parts.constant (B, X, n), against mx.stack:
    one input, a power of two of slots with some unused, chunks of MAX_INPUTS, both axes."""
    monkeypatch.setattr(mx.fast, "cuda_kernel", cuda_emulator.cuda_kernel)
    monkeypatch.setattr(device_stack, "on_device", lambda: True)
    device_stack._kernel.cache_clear()
    rng = np.random.default_rng(1)
    try:
        cases = [((2, 3), 5, 1), ((1,), 3, -1), ((3, 2, 4), 9, 1), ((2, 5), 70, -1), ((4,), 1, 1), ((1, 2), 300, 1)]
        for shape, n, axis in cases:
            arrays = [mx.array(rng.standard_normal(shape) * 3).astype(dtype) for _ in range(n)]
            got, want = device_stack.stack(arrays, axis), mx.stack(arrays, axis=axis)
            assert got.shape == want.shape and got.dtype == dtype and mx.array_equal(got, want).item()
    finally:
        device_stack._kernel.cache_clear()


LAYER_CASES = {
    # name: (chunks, top_k, threshold, n, bank dtype, head_dim (None: 16), left-padded)
    "causal_chunks_then_decode": ([5, 3, 1, 1], 4, None, 300, np.float32, None, False),
    "top_k_past_the_rows": ([4, 1], 40, None, 25, np.float32, None, False),
    "threshold_half_bank_head_dim_48": ([3, 1, 1], 6, 0.05, 500, np.float16, 48, False),
    "left_padded_boolean_mask": ([6, 1, 1], 4, None, 200, np.float32, None, True),
}


@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_the_layer_through_the_emulated_kernels_is_the_portable_path(case, emulated, monkeypatch, tmp_path):
    """ExtendedMindAttention's fused branch as a decode step reaches it: an mlx-lm KVCache hands
    attend_top_k slices of its preallocated buffers (strided k / v, which the emulator passes
    with their strides, as MLX does on the GPU), a chunk of L > 1 tokens after cached ones takes
    the causal mask, a left-padded batch a boolean one. The output, the recorded rows and the
    attention mass equal the portable path's (inputs drawn with a margin at every top-k
    boundary, so that the retrieved sets cannot depend on rounding)."""
    from .test_fused_attention import _compare, _layer, _same_sets

    chunks, top_k, threshold, n, bank_dtype, head_dim, padded = LAYER_CASES[case]
    assert max(chunks) < prefill_attention.MIN_QUERIES  # every chunk: attend_top_k, not prefill_attention
    calls = []
    attend = fa.attend_top_k

    def counted(*a, **kw):
        calls.append([_row_contiguous(x) for x in a[1:3]])  # k, v as the cache gives them
        return attend(*a, **kw)

    def pad_mask(h, cache):
        L, S = h.shape[1], cache.offset + h.shape[1]
        causal = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
        pad = mx.array([[False] * 3 + [True] * (S - 3), [True] * S])[:, None, None, :]
        return mx.logical_and(causal[None, None], pad)

    monkeypatch.setattr(fa, "attend_top_k", counted)
    state, attn = _layer(tmp_path, head_dim)
    extra = {"mask_fn": pad_mask} if padded else {}
    (got, got_rows, got_mass), (want, want_rows, want_mass) = _compare(
        state, attn, chunks, n, head_dim or 16, bank_dtype, top_k=top_k, threshold=threshold, **extra
    )
    assert calls == [[False, False]] * len(chunks)  # every chunk took the kernels, on strided k / v
    _same_sets(got_rows, want_rows)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for g, w in zip(got_mass, want_mass):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("masking", [False, True])
def test_a_remote_layer_through_the_emulated_kernels_is_the_portable_path(
    engine, memory, client, masking, emulated, monkeypatch
):
    """REMOTE retrieval's fused branch (the memory service's hits as the attend kernel's rows:
    ``RemoteRetriever.retrieve_rows``, through host_staging's kernels) against the portable path,
    one layer of the module's engine over a real memory service: a causal chunk after none, then
    decode steps, a batch of two; the output, the recorded rows (citations, -1 where ``masking``'s threshold masked a
    hit) and the attention mass. Both paths get the same hits for the same queries (the layer's
    queries depend on its input only), so nothing here depends on rounding at a top-k edge."""
    from services.generator.remote_retrieval import RemoteRetriever

    from .test_fused_attention import _run
    from .test_host_staging import heap

    # The queries and hits cross through host buffers the (emulated) kernels read and write, as
    # on CUDA, in both paths; a pool of stagings of this test's own.
    monkeypatch.setattr(host_staging, "available", lambda: True)
    monkeypatch.setattr(host_staging, "pinned", heap)
    monkeypatch.setattr(host_staging, "_pool", [])
    mid, _ = memory
    resolved = engine.resolver.resolve((mid,))
    state, attn = engine.state, engine.model.layers[1].self_attn
    chunks, top_k = [5, 1, 1], 4
    x = np.random.default_rng(3).standard_normal((2, sum(chunks), engine.model.args.hidden_size), np.float32)
    threshold = 0.45 if masking else None
    took = []
    attend = fa.attend

    def counted(*a, **kw):
        took.append(a[4].shape)  # the rows the kernel was given
        return attend(*a, **kw)

    def layer(fused):
        retriever = RemoteRetriever(client, resolved)
        was = state.fused
        try:
            return _run(state, attn, mx.array(x), chunks, fused, retriever=retriever, top_k=top_k, threshold=threshold)
        finally:
            state.fused = was
            retriever.close()

    want = engine.mlx.call(lambda: layer(False))
    monkeypatch.setattr(fa, "attend", counted)
    got = engine.mlx.call(lambda: layer(True))
    assert took == [(2, attn.n_heads, n, top_k) for n in chunks]  # every chunk took the kernel
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-4)
    assert len(got[1]) == len(want[1]) == len(chunks)
    for g, w in zip(got[1], want[1]):
        np.testing.assert_array_equal(g, w)
    masked = sum((w < 0).sum() for w in want[1])
    assert (masked > 0) == masking and masked < sum(w.size for w in want[1])
    for g, w in zip(got[2], want[2]):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def _memory_weights64(q, k, allowed, rows, dots, scale):
    """float64 softmax weight of every pick [B, H, L, k] (0 where masked): one softmax per query
    head and token over its memories and the local positions ``allowed``."""
    q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
    B, H, L, _ = q.shape
    rep = H // k.shape[1]
    w = np.zeros(rows.shape)
    for b, h, t in np.ndindex(B, H, L):
        mem = np.where(rows[b, h, t] >= 0, dots[b, h, t].astype(np.float64) * scale, -np.inf)
        local = np.where(allowed[b, t], k[b, h // rep] @ q[b, h, t] * scale, -np.inf)
        logits = np.concatenate([mem, local])
        e = np.exp(logits - logits.max())
        w[b, h, t] = e[: len(mem)] / e.sum()
    return w


def _floored_layer(monkeypatch, launches, seed, B, H, KVH, L, S, d, n, top_k, threshold, mask):
    """One layer's decode inputs (random, float32) through ``launches`` (1, 2 or "matmul": past
    MATMUL_ROWS) -> (q, k [B, KVH, S, d] as numpy, attend(floor) -> [out, mass, rows, dots] numpy)."""
    monkeypatch.setattr(fa, "SCAN_IN_ATTEND", 1 << 30 if launches == 1 else 0)
    if launches == "matmul":
        monkeypatch.setattr(fa, "MATMUL_ROWS", 1)
    rng = np.random.default_rng(seed)
    q, keys = _inputs(rng, B, H, KVH, L, d, n, "random")
    keys_mx = mx.array(keys)
    values_mx = mx.array(rng.standard_normal((KVH, n, d)).astype(np.float32))
    k_mx = mx.array(rng.standard_normal((B, KVH, S, d)).astype(np.float32) * 0.3)
    v_mx = mx.array(rng.standard_normal((B, KVH, S, d)).astype(np.float32))
    keys_t = mx.contiguous(keys_mx.swapaxes(-1, -2))
    inv = mx.rsqrt(mx.maximum(mx.sum(keys_mx * keys_mx, axis=-1), 1e-24))

    def attend(floor):
        got = fa.attend_top_k(
            mx.array(q), k_mx, v_mx, fa.mask_mode(mask, B, L, S), keys_t, inv, values_mx,
            top_k, threshold, 0.125, mx.float32, min_weight=floor,
        )  # fmt: skip
        return [np.array(a) for a in got]

    return q, np.array(k_mx), attend


@pytest.mark.parametrize("launches", [1, 2, "matmul"])
@pytest.mark.parametrize("case", ["b1_gqa4_none_k10", "causal_threshold"])
def test_attend_top_k_floors_the_rows_it_returns_by_their_softmax_weight(case, launches, emulated, monkeypatch):
    """With ``min_weight`` (the citations' floor) the kernel that took the top-k returns -1 for
    every pick whose softmax weight is below it, and only for those (the float64 weights of the
    same picks; the floor sits in the widest gap between the middle weights, checked far wider
    than float32 rounding); the output, the mass and the dots are those of no floor. A batch of
    query rows past MATMUL_ROWS ("matmul": top_k_rows, then ``attend`` given the rows) floors
    them from the weights ``citations.memory_weights`` rebuilds, with the same result."""
    B, H, KVH, L, S, d, n, top_k, threshold = {
        "b1_gqa4_none_k10": (1, 8, 2, 1, 40, 32, 300, 10, None),
        "causal_threshold": (2, 4, 2, 3, 12, 16, 200, 6, 0.0),
    }[case]
    mask = "causal" if L > 1 else None
    q, k, attend = _floored_layer(monkeypatch, launches, 7, B, H, KVH, L, S, d, n, top_k, threshold, mask)
    allowed = np.arange(S)[None, None, :] <= (S - L + np.arange(L))[None, :, None]
    allowed = np.broadcast_to(allowed, (B, L, S))

    out, mass, rows, dots = attend(0.0)
    w = _memory_weights64(q, k, allowed, rows, dots, 0.125)
    kept = np.sort(w[rows >= 0])
    inside = kept[len(kept) // 5 : len(kept) * 4 // 5]
    i = int(np.argmax(np.diff(inside)))
    floor = float(inside[i] + inside[i + 1]) / 2
    assert inside[i + 1] - inside[i] > 1e-4 * floor, "no clear gap between the weights"
    out2, mass2, rows2, dots2 = attend(floor)
    want = np.where((rows >= 0) & (w >= floor), rows, -1)
    np.testing.assert_array_equal(rows2, want)
    assert 0 < (want >= 0).sum() < (rows >= 0).sum()  # some picks dropped, some kept
    for a, b in (out2, out), (mass2, mass), (dots2, dots):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("launches", [1, 2, "matmul"])
@pytest.mark.parametrize("edge", ["zero", "tiny", "above_all", "all_masked"])
def test_attend_top_k_floor_edges(edge, launches, emulated, monkeypatch):
    """The floor's edges: ``min_weight`` 0 (and a tiny one, under every weight) keeps every pick
    the threshold kept, bit for bit the rows of no floor; one above every weight drops them all;
    with every pick masked by the threshold the rows are all -1 whatever the floor, and the output
    is the attention over the local positions alone (mass 0). Output, mass and dots never change."""
    B, H, KVH, L, S, d, n, top_k = 2, 4, 2, 1, 9, 16, 120, 5
    threshold = 1.5 if edge == "all_masked" else None  # no cosine reaches it
    q, k, attend = _floored_layer(monkeypatch, launches, 11, B, H, KVH, L, S, d, n, top_k, threshold, None)

    out, mass, rows, dots = attend(0.0)
    allowed = np.ones((B, L, S), bool)
    w = _memory_weights64(q, k, allowed, rows, dots, 0.125)
    floor = {"zero": 0.0, "tiny": 1e-30, "above_all": 0.5, "all_masked": 1e-3}[edge]
    if edge == "above_all":
        assert w.max() < 0.45, "a pick weighs about the floor: pick another"
    if edge == "tiny":
        assert w[rows >= 0].min() > 1e-20
    out2, mass2, rows2, dots2 = attend(floor)
    if edge in ("zero", "tiny"):
        assert (rows >= 0).all()
        np.testing.assert_array_equal(rows2, rows)
    else:
        np.testing.assert_array_equal(rows2, np.full_like(rows, -1))
    if edge == "all_masked":
        assert (rows == -1).all() and not mass.any()
    for a, b in (out2, out), (mass2, mass), (dots2, dots):
        np.testing.assert_array_equal(a, b)


def _recorded(state, attn, x, chunks, fused, retriever, **ctx):
    """x through one layer in chunks (an mlx-lm KVCache), fused or portable, recording citations
    with ``ctx``'s floor. -> the Picks each chunk recorded, evaluated."""
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.models.cache import KVCache

    from services.generator.extended_attention import MemoryContext

    state.fused = fused
    record = []
    state.memory = MemoryContext(retriever, record=record, **ctx)
    cache, start = KVCache(), 0
    try:
        for n in chunks:
            h = x[:, start : start + n]
            mx.eval(attn(h, create_attention_mask(h, cache), cache))
            start += n
    finally:
        state.memory = None
    picks = [p for _, p in record]
    mx.eval([p.arrays() for p in picks])
    return picks


@pytest.mark.parametrize("path", ["one_launch", "two_launches", "matmul"])
def test_the_layer_floors_through_the_emulated_kernels_as_the_portable_path_counts(
    path, emulated, monkeypatch, tmp_path
):
    """With a citation floor, the fused decode kernel records rows it floored itself (no dots: a
    flush joins them as they are) where the portable path records weighed picks: counted
    (``picked_rows``, the two paths' forwards in one flush, as when a context outgrows the
    kernel's shared memory), each query head keeps the same rows on both paths (the floor in the
    widest gap of the weights, far wider than float32 rounding). A batch of query rows past
    MATMUL_ROWS (top_k_rows, then ``attend``: no kernel has the weights at hand) records weighed
    picks as the portable path does: no forward builds a weights graph of its own, which a flush
    would evaluate layer by layer and forward by forward, a dozen launches each."""
    from services.generator.citations import Picks, memory_weights, picked_rows

    from .test_fused_attention import _has_margin, _layer, _retriever

    monkeypatch.setattr(fa, "SCAN_IN_ATTEND", 1 << 30 if path == "one_launch" else 0)
    if path == "matmul":
        monkeypatch.setattr(fa, "MATMUL_ROWS", 1)
    chunks, n, top_k, d = [4, 1, 1], 120, 5, 16
    state, attn = _layer(tmp_path)
    for seed in range(1, 30):
        x = mx.random.normal((2, sum(chunks), 128), key=mx.random.key(seed))
        retriever, keys = _retriever(2, d, n, np.float32)
        portable = _recorded(state, attn, x, chunks, False, retriever, top_k=top_k, cite_min_weight=1e-9)
        if _has_margin(retriever.queries, keys, top_k, None):
            break
    else:
        raise AssertionError("no seed gave inputs with a margin at the top-k boundary")
    # the floor: in the widest gap between the middle weights of the decode forwards' picks
    weights = [np.array(memory_weights(p.rows, p.dots, p.mass, p.scale)) for p in portable[1:]]
    kept = np.sort(np.concatenate([w.ravel() for w in weights]))
    inside = kept[len(kept) // 5 : len(kept) * 4 // 5]
    i = int(np.argmax(np.diff(inside)))
    floor = float(inside[i] + inside[i + 1]) / 2
    assert inside[i + 1] - inside[i] > 1e-3 * floor, "no clear gap between the weights"
    portable = _recorded(
        state, attn, x, chunks, False, _retriever(2, d, n, np.float32)[0], top_k=top_k, cite_min_weight=floor
    )
    weighing, weights_of = [], fa.memory_weights
    monkeypatch.setattr(fa, "memory_weights", lambda *a: weighing.append(1) or weights_of(*a))
    fused = _recorded(
        state, attn, x, chunks, True, _retriever(2, d, n, np.float32)[0], top_k=top_k, cite_min_weight=floor
    )
    assert weighing == [], "a forward built a weights graph of its own"
    assert all(p.dots is not None for p in portable)
    if path == "matmul":
        assert all(p.dots is not None for p in fused), "past MATMUL_ROWS the picks are weighed at the flush"
        fused = [Picks(mx.where(memory_weights(*p.arrays(), p.scale) >= floor, p.rows, -1)) for p in fused]
    else:
        assert all(p.dots is None for p in fused), "the fused decode kernel records the rows it floored"
    for f, p, w in zip(fused[1:], portable[1:], weights):
        want = np.where(w >= floor, np.array(p.rows), -1)
        assert 0 < (want >= 0).sum() < want.size
        np.testing.assert_array_equal(np.sort(np.array(f.rows), -1), np.sort(want, -1))
    # one flush of decode forwards, fused and portable mixed: each batch row counts the same rows
    mixed = np.array(picked_rows([[fused[1]], [portable[2]]], min_weight=floor))
    alone = np.array(picked_rows([[portable[1]], [portable[2]]], min_weight=floor))
    for b in range(2):
        np.testing.assert_array_equal(np.sort(mixed[b]), np.sort(alone[b]))
