"""The prefill merge kernels (prefill_merge_kernels.py: MERGE_MMA, whose warps compute the local logits
of 16 query rows by tensor-core products, and MERGE_LOGITS, which reads a float32 matmul's) run on
the CPU emulator (cuda_emulator.py; the tensor-core product by shuffles, kernel_parts.MMA_HEADER)
through ``prefill_attention.attend`` itself, against a float64 softmax over [memories | local
context] of the same (rounded) inputs: float16 and bfloat16 queries take MERGE_MMA, float32 ones
MERGE_LOGITS. The inputs are slices of longer buffers (queries, and keys and values as a cache holds
them) and, merged in chunks of query rows, the memories' rows and dots slices of the whole arrays,
so that the kernels' stride arithmetic is what is tested. Query counts leave the
last 16-row tile part-filled. On CUDA, test_prefill_attention.py runs the real kernels (also on
strided float16 and bfloat16 inputs of every ``helpers.LAST_AXIS_LAYOUTS``)."""

from __future__ import annotations

import sys

import mlx.core as mx
import numpy as np
import pytest

from services.generator import fused_attention, prefill_attention, prefill_merge_kernels

from . import cuda_emulator
from .helpers import LAST_AXIS_LAYOUTS, last_axis_layout, prefill_picks
from .np_reference import attend_over_picks

pytestmark = pytest.mark.skipif(
    cuda_emulator.CXX is None or sys.platform != "linux", reason="the emulator needs a C++ compiler and glibc ucontext"
)


@pytest.fixture
def emulated(monkeypatch):
    """The merge kernels on the emulator, taken as on a CUDA machine (compute capability 9.0); which
    kernel each call got."""
    monkeypatch.setattr(mx.fast, "cuda_kernel", cuda_emulator.cuda_kernel)
    monkeypatch.setattr(fused_attention, "enabled", lambda mode="auto": True)
    monkeypatch.setattr(mx, "device_info", lambda: {"compute_capability_major": 9, "compute_capability_minor": 0})
    prefill_merge_kernels.merge_kernel.cache_clear()
    prefill_attention.tensor_cores.cache_clear()
    made = []
    kernel = prefill_merge_kernels.merge_kernel

    def spy(mma=False):
        made.append(mma)
        return kernel(mma)

    monkeypatch.setattr(prefill_merge_kernels, "merge_kernel", spy)
    yield made
    kernel.cache_clear()
    prefill_attention.tensor_cores.cache_clear()


def _rounded(a: np.ndarray, dtype) -> tuple[mx.array, np.ndarray]:
    """(``a`` in ``dtype`` on MLX, the same values as float64)."""
    x = mx.array(a.astype(np.float32)).astype(dtype)
    return x, np.array(x.astype(mx.float32)).astype(np.float64)


@pytest.mark.parametrize(
    "dtype,mask_kind,prefix,d,k,L",
    [
        (mx.float16, "causal", 0, 64, 10, 19),
        (mx.float16, "causal", 7, 16, 5, 35),  # a chunk after 7 cached positions; 3 tiles, the last of 3 rows
        (mx.bfloat16, "causal", 3, 64, 8, 16),
        (mx.float16, "padding", 2, 32, 5, 17),  # row 0 left-padded by 3 positions (bool mask)
        (mx.bfloat16, "none", 12, 80, 32, 9),  # no mask; a head size past a warp's 32 lanes; 32 memories
        (mx.float32, "causal", 4, 16, 5, 18),  # float32: the logits kernel
    ],
)
@pytest.mark.parametrize("chunk_rows", [None, 8])
def test_merge_kernels_match_one_softmax_over_memories_and_context(
    emulated, dtype, mask_kind, prefix, d, k, L, chunk_rows, monkeypatch
):
    rng = np.random.default_rng(L + d)
    B, H, KVH, n = 2, 4, 2, 30
    S = prefix + L
    if chunk_rows:
        monkeypatch.setattr(prefill_attention, "MIN_QUERIES", 1)
        monkeypatch.setattr(prefill_attention, "MAX_LOGITS", B * H * chunk_rows * S)
    scale = d**-0.5
    # Queries positions 2 ... L + 1 of a longer buffer; keys and values the first S positions of a
    # cache buffer of S + 5: the kernels read their strides.
    q, q64 = _rounded(rng.standard_normal((B, H, L + 3, d)), dtype)
    q, q64 = q[:, :, 2 : L + 2], q64[:, :, 2 : L + 2]
    kbuf, k64 = _rounded(rng.standard_normal((B, KVH, S + 5, d)), dtype)
    vbuf, v64 = _rounded(rng.standard_normal((B, KVH, S + 5, d)), dtype)
    kk, vv, k64, v64 = kbuf[:, :, :S], vbuf[:, :, :S], k64[:, :, :S], v64[:, :, :S]
    bank, bank64 = _rounded(rng.standard_normal((KVH, n, d)), dtype)
    rows, dots, mask, allowed = prefill_picks(rng, B, H, L, S, n, k, mask_kind)
    out, mass = prefill_attention.attend(q, kk, vv, mask, mx.array(rows), mx.array(dots), bank, scale, mx.float32)
    want, want_mass = attend_over_picks(q64, k64, v64, allowed, rows, dots, bank64, scale)
    mma = dtype != mx.float32
    assert emulated and all(m == mma for m in emulated)  # the kernel the dtype takes
    assert len(emulated) == (-(-L // chunk_rows) if chunk_rows else 1)
    # The fused attention's local output is rounded to the queries' dtype before the merge.
    tol = {mx.float16: 2e-3, mx.bfloat16: 1.6e-2, mx.float32: 1e-5}[dtype]
    assert out.dtype == mx.float32 and out.shape == (B, L, H * d) and mass.shape == (B, H, L)
    np.testing.assert_allclose(np.array(out), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.array(mass), want_mass, rtol=2e-5, atol=1e-6)
    assert np.array(mass)[1, 0, 0] == 0.0
    # The memories' values loaded one at a time (MERGE_GROUP 1) or 3 at a time: the same sums.
    for group in (1, 3):
        monkeypatch.setattr(prefill_merge_kernels, "MERGE_GROUP", group)
        again = prefill_attention.attend(q, kk, vv, mask, mx.array(rows), mx.array(dots), bank, scale, mx.float32)
        assert np.array_equal(np.array(again[0]), np.array(out)) and np.array_equal(np.array(again[1]), np.array(mass))


@pytest.mark.parametrize("cc,mma", [((7, 5), False), ((8, 0), True), ((9, 0), True)])
def test_merge_takes_the_tensor_core_kernel_only_where_the_gpu_has_mma_m16n8k16(emulated, cc, mma, monkeypatch):
    """mma.sync.m16n8k16 (.f16 and .bf16 alike) needs sm_80: ptxas refuses MERGE_MMA for sm_75
    ("Feature '.m16n8k16' requires .target sm_80 or higher"; `nvcc -arch=sm_75 -cubin` on its
    source), and a Turing GPU (compute capability 7.5) is a platform docs/platform.md supports. There
    a float16 prefill must take the float32 logits kernel, not fail to compile."""
    info = {"compute_capability_major": cc[0], "compute_capability_minor": cc[1], "device_name": "emulated"}
    monkeypatch.setattr(mx, "device_info", lambda: info)
    prefill_attention.tensor_cores.cache_clear()
    rng = np.random.default_rng(3)
    B, H, KVH, L, S, d, k, n = 1, 2, 1, 17, 20, 32, 4, 10
    q, q64 = _rounded(rng.standard_normal((B, H, L, d)), mx.float16)
    kk, k64 = _rounded(rng.standard_normal((B, KVH, S, d)), mx.float16)
    vv, v64 = _rounded(rng.standard_normal((B, KVH, S, d)), mx.float16)
    bank, bank64 = _rounded(rng.standard_normal((KVH, n, d)), mx.float16)
    rows = rng.integers(0, n, (B, H, L, k)).astype(np.int32)
    dots = rng.standard_normal((B, H, L, k)).astype(np.float32)
    out, mass = prefill_attention.attend(q, kk, vv, "causal", mx.array(rows), mx.array(dots), bank, d**-0.5, mx.float32)
    allowed = np.broadcast_to(np.arange(S - L, S)[:, None] >= np.arange(S)[None], (B, L, S))
    want, want_mass = attend_over_picks(q64, k64, v64, allowed, rows, dots, bank64, d**-0.5)
    assert emulated == [mma]
    np.testing.assert_allclose(np.array(out), want, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(np.array(mass), want_mass, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("layout", LAST_AXIS_LAYOUTS)
@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16])
def test_tensor_core_merge_reads_queries_and_keys_of_any_layout(emulated, layout, dtype):
    """MERGE_MMA loads a pair of adjacent 16-bit elements in one 4-byte load where the last axis is
    contiguous and the pairs are 4-byte aligned, else element by element: queries and keys as slices
    of a cache buffer (aligned pairs), of a buffer one element wider (odd row strides and offsets)
    and every other element of a buffer twice as wide (last stride 2) give the same softmax."""
    rng = np.random.default_rng(11)
    B, H, KVH, L, prefix, d, k, n = 2, 4, 2, 21, 6, 32, 6, 25
    S = prefix + L
    width, cut = last_axis_layout(layout, d)
    qbuf, q64 = _rounded(rng.standard_normal((B, H, L + 1, width)), dtype)
    kbuf, k64 = _rounded(rng.standard_normal((B, KVH, S + 3, width)), dtype)
    vv, v64 = _rounded(rng.standard_normal((B, KVH, S, d)), dtype)
    q, q64 = qbuf[:, :, 1:, cut], q64[:, :, 1:, cut]
    kk, k64 = kbuf[:, :, :S, cut], k64[:, :, :S, cut]
    bank, bank64 = _rounded(rng.standard_normal((KVH, n, d)), dtype)
    rows, dots, mask, allowed = prefill_picks(rng, B, H, L, S, n, k, "causal")
    out, mass = prefill_attention.attend(q, kk, vv, mask, mx.array(rows), mx.array(dots), bank, d**-0.5, mx.float32)
    want, want_mass = attend_over_picks(q64, k64, v64, allowed, rows, dots, bank64, d**-0.5)
    assert emulated == [True]
    tol = 2e-3 if dtype == mx.float16 else 1.6e-2
    np.testing.assert_allclose(np.array(out), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.array(mass), want_mass, rtol=2e-5, atol=1e-6)
