"""Extended mind attention of one layer in two fused steps (two or three kernels), on MLX's CUDA backend.

The portable path (``ExtendedMindAttention._with_memories`` over ``local_top_k``) runs about twenty
small kernels per layer: the cosine matmul, norms, a two-stage partition, gathers, the local
logits, the mask, a concatenation, the softmax and two weighted sums. On a fast GPU each costs
more in launch and latency than in arithmetic, so LOCAL decode spent most of its step waiting on
them (docs/architecture.md, "Fused extended attention"). Here the same computation is two steps:

- ``top_k_rows``: per query head and token, the exact cosine top-k over the bank's rows (each
  thread scans a stripe of rows and keeps its own sorted top-k; the block merges them, and a
  second kernel merges the blocks' lists when a decode row's scan is split over several; a
  prefill's scores come from one matmul instead, ranked in ``prefill_top_k``), the raw dot
  products of the winners and the threshold;
- ``attend``: per query head and token, one softmax over [memory logits | local logits] (causal,
  array-masked or unmasked) and the weighted sum of the memory values (read from the bank by row)
  and the local values (read from the KV cache in place, strides and all), written straight in the
  [B, L, H * d] layout ``o_proj`` takes, plus the attention mass on the memories.

Both compute in float32 from inputs in their own dtypes, as the portable path does, and are
checked against it and against the numpy reference (tests/generator/test_fused_attention.py and
every extended-attention test when run on CUDA). Metal has no port yet: there the portable path
runs.
"""

from __future__ import annotations

import functools
import math

import mlx.core as mx

from services.generator import kernel_parts, prefill_top_k

MODES = ("auto", "off")
MAX_TOP_K = 32
MAX_HEAD_DIM = 256
_TOPK_THREADS = 128
_ROWS_PER_THREAD = 4  # bank rows each scan thread takes at least, when a row's scan is split
_FILL_BLOCKS = 512  # scan blocks that keep an H100/H200 (132 SMs) busy
MATMUL_ROWS = 2048  # query rows (B * H * L) from which the cosines come from one matmul
_ATTEND_THREADS = 256
_NO_MASK, _CAUSAL, _ARRAY_MASK = 0, 1, 2


# The top-k: a scan kernel, one block per (query row, chunk of the bank's rows): each thread keeps
# the sorted top-k of its stripe in registers, the block merges its threads' lists. With one chunk
# it writes the result; with several (a short batch over a long bank: more blocks than query
# rows keep the GPU busy) each chunk writes its candidates and a merge kernel, one block per
# query row, takes the top-k of them.

# Template K is the size of the per-thread lists (8, 16 or 32: one compiled kernel serves every
# top_k up to it, since the top k of a list are the first k of its top K); k <= K comes at run
# time, as does the threshold (-inf for none).
# inputs: q [B, H, L, D] (contiguous), keys_t [KVH, D, N], inv_norms [KVH, N] float32, threshold
# [1] float32, topk [1] int32 (k), chunks [1] int32 (C). outputs, C == 1: rows [B, H, L, k] int32
# (-1 where the cosine is not above the threshold) and dots [B, H, L, k] float32 (raw q . k);
# C > 1: the candidates' cosines [B * H * L, C, k] float32 and rows [B * H * L, C, k] int32.
_TOPK_SCAN_SOURCE = """
  const int H = q_shape[1];
  const int L = q_shape[2];
  const int KVH = keys_t_shape[0];
  const int N = keys_t_shape[2];
  const int C = chunks[0];
  const int k = topk[0];
  const int row = blockIdx.x / C;
  const int c = blockIdx.x % C;
  const int tid = threadIdx.x;
  const int h = (row / L) % H;
  const int g = h / (H / KVH);
  const int per = (N + C - 1) / C;
  const int lo = c * per;
  const int hi = min(N, lo + per);

  __shared__ float qs[D];
  __shared__ float red[32];
  __shared__ float sh_s[T * K];
  __shared__ int sh_i[T * K];
  __shared__ float win_s[K];
  __shared__ int win_i[K];
  __shared__ float wv[T / 32];
  __shared__ int wt[T / 32];

  for (int e = tid; e < D; e += T) qs[e] = static_cast<float>(q[(size_t)row * D + e]);
  __syncthreads();
  float part = 0.f;
  for (int e = tid; e < D; e += T) part += qs[e] * qs[e];
  const float q_inv = rsqrtf(fmaxf(em_block_sum<T>(part, red), 1e-24f));

  float s[K];
  int ix[K];
#pragma unroll
  for (int j = 0; j < K; ++j) { s[j] = EM_NEG_INF; ix[j] = -1; }
  const Tk* kg = keys_t + (size_t)g * D * N;
  const float* ng = inv_norms + (size_t)g * N;
  for (int n = lo + tid; n < hi; n += T) em_insert<K>(s, ix, em_dot_t<D, Tk>(qs, kg, N, n) * q_inv * ng[n], n);
  em_block_top_k<T, K>(s, ix, k, sh_s, sh_i, win_s, win_i, wv, wt);

"""
_TOPK_SCAN_FINAL = """
  if (tid < k) {
    const int n = win_i[tid];
    const bool ok = n >= 0 && win_s[tid] > threshold[0];
    rows[(size_t)row * k + tid] = ok ? n : -1;
    dots[(size_t)row * k + tid] = n >= 0 ? em_dot_t<D, Tk>(qs, kg, N, n) : 0.f;
  }
"""
_TOPK_SCAN_CHUNK = """
  if (tid < k) {
    cand_s[((size_t)row * C + c) * k + tid] = win_s[tid];
    cand_i[((size_t)row * C + c) * k + tid] = win_i[tid];
  }
"""

# inputs: q, keys_t, threshold, topk as above; cand_s / cand_i [B * H * L, C, k] from the scan.
# outputs: rows, dots [B, H, L, k] as the one-chunk scan writes them.
_TOPK_MERGE_SOURCE = """
  const int H = q_shape[1];
  const int L = q_shape[2];
  const int KVH = keys_t_shape[0];
  const int N = keys_t_shape[2];
  const int k = topk[0];
  const int CK = cand_s_shape[1] * k;
  const int row = blockIdx.x;
  const int tid = threadIdx.x;
  const int h = (row / L) % H;
  const int g = h / (H / KVH);

  __shared__ float qs[D];
  __shared__ float sh_s[T * K];
  __shared__ int sh_i[T * K];
  __shared__ float win_s[K];
  __shared__ int win_i[K];
  __shared__ float wv[T / 32];
  __shared__ int wt[T / 32];

  for (int e = tid; e < D; e += T) qs[e] = static_cast<float>(q[(size_t)row * D + e]);
  float s[K];
  int ix[K];
#pragma unroll
  for (int j = 0; j < K; ++j) { s[j] = EM_NEG_INF; ix[j] = -1; }
  for (int j = tid; j < CK; j += T) {
    const int n = cand_i[(size_t)row * CK + j];
    if (n >= 0) em_insert<K>(s, ix, cand_s[(size_t)row * CK + j], n);
  }
  em_block_top_k<T, K>(s, ix, k, sh_s, sh_i, win_s, win_i, wv, wt);
  if (tid < k) {
    const Tk* kg = keys_t + (size_t)g * D * N;
    const int n = win_i[tid];
    const bool ok = n >= 0 && win_s[tid] > threshold[0];
    rows[(size_t)row * k + tid] = ok ? n : -1;
    dots[(size_t)row * k + tid] = n >= 0 ? em_dot_t<D, Tk>(qs, kg, N, n) : 0.f;
  }
"""

# One block per (b, h, l) query row; dynamic shared memory holds its K + S logits. inputs: q
# [B, H, L, D] (contiguous), k / v [B, KVH, S, D] (any strides: the KV cache in place), mask
# [B, L, S] bool (MASK == 2; else unused), mem_rows / mem_dots [B, H, L, K], bank_values [KVH, N, D]
# (contiguous), scale [1] float32. outputs: out [B, L, H * D], mass [B, H, L] float32.
_ATTEND_HEAD = """
  extern __shared__ float lg[];
  const int K = mem_rows_shape[3];
  const int H = q_shape[1];
  const int L = q_shape[2];
  const int KVH = k_shape[1];
  const int S = k_shape[2];
  const int N = bank_values_shape[1];
  const int row = blockIdx.x;
  const int tid = threadIdx.x;
  const int b = row / (H * L);
  const int h = (row / L) % H;
  const int l = row % L;
  const int g = h / (H / KVH);
  const int total = K + S;
  const float sc = scale[0];
  constexpr int W = T / 32;
  constexpr int E = (D + 31) / 32;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  // Causal: query l sees local positions <= S - L + l; the later ones get weight 0 exactly.
  const int local_end = MASK == 1 ? min(S, S - L + l + 1) : S;

  __shared__ float qs[D];
  __shared__ float red[32];
  __shared__ float part[(T / 32) * D];

  for (int e = tid; e < D; e += T) qs[e] = static_cast<float>(q[(size_t)row * D + e]);
  __syncthreads();

"""

# One warp per local position, four at a time: lane i multiplies columns i, i + 32, ... (a row is
# one coalesced read, where a thread per position reads a line per column), four rows' loads are
# in flight before the shuffles sum them.
_ATTEND_LOGITS_WARP = """
  const size_t kb = (size_t)b * k_strides[0] + (size_t)g * k_strides[1];
  float mx_local = EM_NEG_INF;
  for (int j = tid; j < K; j += T) {
    const float x = mem_rows[(size_t)row * K + j] >= 0 ? mem_dots[(size_t)row * K + j] * sc : EM_NEG_INF;
    lg[j] = x;
    mx_local = fmaxf(mx_local, x);
  }
  for (int p0 = warp * 4; p0 < S; p0 += W * 4) {
    float acc4[4];
    bool ok4[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int pos = p0 + u;
      bool ok = pos < local_end;
      if (MASK == 2 && ok) ok = mask[((size_t)b * L + l) * S + pos];
      ok4[u] = ok;
      acc4[u] = 0.f;
      if (ok) {
        const Tkv* kr = k + kb + (size_t)pos * k_strides[2];
#pragma unroll
        for (int i = 0; i < E; ++i) {
          const int e = lane + 32 * i;
          if (e < D) acc4[u] += qs[e] * static_cast<float>(kr[(size_t)e * k_strides[3]]);
        }
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
      for (int u = 0; u < 4; ++u) acc4[u] += __shfl_xor_sync(0xffffffff, acc4[u], o);
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      if (p0 + u < S) {
        const float x = ok4[u] ? acc4[u] * sc : -1e30f;
        if (lane == 0) lg[K + p0 + u] = x;
        mx_local = fmaxf(mx_local, x);
      }
    }
  }
"""

_ATTEND_TAIL = """
  const float m = em_block_max<T>(mx_local, red);
  float sum_local = 0.f;
  float mem_local = 0.f;
  for (int j = tid; j < total; j += T) {
    const float p = expf(lg[j] - m);
    lg[j] = p;
    sum_local += p;
    if (j < K) mem_local += p;
  }
  const float denom = em_block_sum<T>(sum_local, red);
  const float mem_sum = em_block_sum<T>(mem_local, red);

  // Weighted sum: warp w takes every W-th row (memories, then local positions), lane i the
  // columns i, i + 32, ... (coalesced); the rows' loads are unrolled so several are in flight.
  float acc[E];
#pragma unroll
  for (int i = 0; i < E; ++i) acc[i] = 0.f;
  for (int j = warp; j < K; j += W) {
    const float p = lg[j];
    const int r = max(mem_rows[(size_t)row * K + j], 0);  // a masked row has p == 0
    const Tv* vr = bank_values + ((size_t)g * N + r) * D;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int e = lane + 32 * i;
      if (e < D) acc[i] += p * static_cast<float>(vr[e]);
    }
  }
  const size_t vb = (size_t)b * v_strides[0] + (size_t)g * v_strides[1];
#pragma unroll 4
  for (int j = K + warp; j < K + local_end; j += W) {
    const float p = lg[j];
    const Tkv* vr = v + vb + (size_t)(j - K) * v_strides[2];
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int e = lane + 32 * i;
      if (e < D) acc[i] += p * static_cast<float>(vr[(size_t)e * v_strides[3]]);
    }
  }
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const int e = lane + 32 * i;
    if (e < D) part[warp * D + e] = acc[i];
  }
  __syncthreads();
  if (tid < D) {
    float o = 0.f;
    for (int i = 0; i < W; ++i) o += part[i * D + tid];
    out[(((size_t)b * L + l) * H + h) * D + tid] = static_cast<To>(o / denom);
  }
  if (tid == 0) mass[row] = mem_sum / denom;
"""


@functools.cache
def _topk_scan_kernel(final: bool):
    outputs = ["rows", "dots"] if final else ["cand_s", "cand_i"]
    return mx.fast.cuda_kernel(
        name="extmind_topk_scan" if final else "extmind_topk_chunks",
        input_names=["q", "keys_t", "inv_norms", "threshold", "topk", "chunks"],
        output_names=outputs,
        source=_TOPK_SCAN_SOURCE + (_TOPK_SCAN_FINAL if final else _TOPK_SCAN_CHUNK),
        header=kernel_parts.HEADER + kernel_parts.TOPK_HEADER,
    )


@functools.cache
def _topk_merge_kernel():
    return mx.fast.cuda_kernel(
        name="extmind_topk_merge",
        input_names=["q", "keys_t", "threshold", "topk", "cand_s", "cand_i"],
        output_names=["rows", "dots"],
        source=_TOPK_MERGE_SOURCE,
        header=kernel_parts.HEADER + kernel_parts.TOPK_HEADER,
    )


@functools.cache
def _attend_kernel(shared_floats: int):
    return mx.fast.cuda_kernel(
        name="extmind_attend",
        input_names=["q", "k", "v", "mask", "mem_rows", "mem_dots", "bank_values", "scale"],
        output_names=["out", "mass"],
        source=_ATTEND_HEAD + _ATTEND_LOGITS_WARP + _ATTEND_TAIL,
        header=kernel_parts.HEADER,
        ensure_row_contiguous=False,
        shared_memory=4 * shared_floats,
    )


def enabled(mode: str = "auto") -> bool:
    """``--fused-attention``: "auto" = on when MLX computes on its CUDA backend, "off" = never.
    Raises ValueError for another mode (an engine configured in code, past the flag's check,
    would otherwise run as "auto")."""
    if mode not in MODES:
        raise ValueError(f"fused attention mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "off":
        return False
    return mx.default_device() == mx.gpu and mx.cuda.is_available()


def mask_mode(mask, B: int, L: int, S: int):
    """The kernel's mask mode and array for an mlx-lm attention mask, or None when the kernel
    cannot take it (an additive float mask): (mode, bool array [B, L, S] or a placeholder).
    mlx-lm builds one mask per forward and hands every layer the same array, so the last one
    converted is remembered: a padded batch's decode step makes one contiguous copy, not one per
    layer."""
    global _last_mask
    if mask is None:
        return _NO_MASK, kernel_parts.scalar(False, mx.bool_)
    if isinstance(mask, str):
        return (_CAUSAL, kernel_parts.scalar(False, mx.bool_)) if mask == "causal" else None
    if mask.dtype != mx.bool_:
        return None
    if _last_mask[0] is mask and _last_mask[1] == (B, L, S):
        return _last_mask[2]
    arr = mask
    if arr.ndim == 4:
        if arr.shape[1] != 1:
            return None
        arr = arr[:, 0]
    out = _ARRAY_MASK, mx.contiguous(mx.broadcast_to(arr, (B, L, S)))
    _last_mask = (mask, (B, L, S), out)  # holds the mask: its id is not reused while remembered
    return out


_last_mask: tuple = (None, None, None)


def forget_mask() -> None:
    """Drops the remembered mask and its conversion (``prefill_attention.forget_masks`` calls it
    after each scheduler step and Memorize chunk): a forward's mask is not held past it (a long
    context's prefill chunk, which takes the portable path after ``mask_mode``, has a
    [B, 1, L, S] mask of hundreds of MiB; an unpadded decode batch passes no mask that would
    replace it, nor does an idle generator)."""
    global _last_mask
    _last_mask = (None, None, None)


def _shared_bucket(floats: int) -> int:
    """Dynamic shared memory is fixed per kernel object: round up to a power of two (>= 1 024)."""
    return max(1024, 1 << (floats - 1).bit_length())


@functools.cache
def max_local_positions() -> int:
    """Most memory + local positions (K + S logits) one attend block holds in shared memory on
    this GPU: a power of two within its per-block limit (opt-in: 227 KiB on compute capability
    9.x / 10.x, 163 KiB on 8.0 / 8.7, 99 KiB on other 8.x / 12.x, 64 KiB on 7.5) less room for
    the kernel's static shared memory. Longer contexts take the portable path."""
    info = mx.device_info()
    cc = (int(info.get("compute_capability_major", 7)), int(info.get("compute_capability_minor", 5)))
    kib = 227 if cc[0] in (9, 10) else 163 if cc in ((8, 0), (8, 7)) else 99 if cc[0] >= 8 else 64
    floats = (kib - 16) * 1024 // 4
    return 1 << (floats.bit_length() - 1)


def chunks_for(rows: int, n: int) -> int:
    """How many blocks share one query row's scan of an ``n``-row bank: enough blocks to fill the
    GPU (a decode step has only B * H query rows), at least ``_ROWS_PER_THREAD`` rows per thread."""
    if rows >= _FILL_BLOCKS:
        return 1
    most = max(1, n // (_TOPK_THREADS * _ROWS_PER_THREAD))
    return max(1, min(most, -(-_FILL_BLOCKS // rows)))


def top_k_rows(q: mx.array, keys_t: mx.array, inv_norms: mx.array, top_k: int, threshold: float | None):
    """Exact cosine top-k of every query head and token over one layer's bank.

    q [B, H, L, d] (rotated queries, any float dtype); keys_t [KVH, d, N] and inv_norms [KVH, N]
    float32 as ``bank_cache.Bank`` holds them. Returns (rows [B, H, L, k] int32, -1 where the
    cosine is not above ``threshold``; dots [B, H, L, k] float32, the raw q . k), k = min(top_k, N),
    rows in descending cosine. Ties at the k-th place may pick either row."""
    B, H, L, d = q.shape
    if min(top_k, keys_t.shape[2]) > MAX_TOP_K or d > MAX_HEAD_DIM:
        raise ValueError(f"the fused top-k takes k <= {MAX_TOP_K} and head size <= {MAX_HEAD_DIM}")
    n = keys_t.shape[2]
    k = min(top_k, n)
    q = mx.contiguous(q)
    thr = kernel_parts.scalar(float(threshold) if threshold is not None else -math.inf, mx.float32)
    kk = kernel_parts.scalar(k, mx.int32)
    lists = ("K", list_size(k))
    rows = B * H * L
    if rows >= MATMUL_ROWS:
        # Many query rows (prefill): each scan block would read the whole bank once per row;
        # one matmul reads it once, and prefill_top_k ranks its scores.
        return prefill_top_k.top_k_rows(q, keys_t, inv_norms, k, lists[1], thr)
    c = chunks_for(rows, n)
    template = [("Tk", keys_t.dtype), ("D", d), lists]
    scan = _topk_scan_kernel(c == 1)(
        inputs=[q, keys_t, inv_norms, thr, kk, kernel_parts.scalar(c, mx.int32)],
        template=[*template, ("T", _TOPK_THREADS)],
        grid=(rows * c * _TOPK_THREADS, 1, 1),
        threadgroup=(_TOPK_THREADS, 1, 1),
        output_shapes=[(B, H, L, k), (B, H, L, k)] if c == 1 else [(rows, c, k), (rows, c, k)],
        output_dtypes=[mx.int32, mx.float32] if c == 1 else [mx.float32, mx.int32],
    )
    if c == 1:
        return scan[0], scan[1]
    rows_out, dots = _topk_merge_kernel()(
        inputs=[q, keys_t, thr, kk, scan[0], scan[1]],
        template=[*template, ("T", 32)],
        grid=(rows * 32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(B, H, L, k), (B, H, L, k)],
        output_dtypes=[mx.int32, mx.float32],
    )
    return rows_out, dots


def list_size(k: int) -> int:
    """The compiled list size serving a top-k of ``k`` (<= MAX_TOP_K): 8, 16 or 32."""
    return 8 if k <= 8 else 16 if k <= 16 else 32


def attend(q, k, v, mask, mem_rows, mem_dots, bank_values, scale: float, out_dtype):
    """One softmax over [memories | local context] for every query head and token.

    q [B, H, L, d] rotated queries; k, v [B, KVH, S, d] the local keys (rotated) and values, any
    strides; ``mask`` as ``mask_mode`` returns it; mem_rows / mem_dots [B, H, L, k] from
    ``top_k_rows``; bank_values [KVH, N, d] the bank's values. Returns (out [B, L, H * d] in
    ``out_dtype``, mass [B, H, L] float32: each head's attention weight on its memories)."""
    B, H, L, d = q.shape
    if mem_rows.shape[-1] > MAX_TOP_K or d > MAX_HEAD_DIM:
        raise ValueError(f"the fused attention takes k <= {MAX_TOP_K} and head size <= {MAX_HEAD_DIM}")
    S = k.shape[2]
    kk = mem_rows.shape[-1]
    mode, mask_arr = mask
    floats = _shared_bucket(kk + S)
    out, mass = _attend_kernel(floats)(
        inputs=[
            mx.contiguous(q),
            k,
            v,
            mask_arr,
            mem_rows,
            mem_dots,
            bank_values,
            kernel_parts.scalar(float(scale), mx.float32),
        ],
        template=[
            ("Tkv", k.dtype),
            ("Tv", bank_values.dtype),
            ("To", out_dtype),
            ("D", d),
            ("T", _ATTEND_THREADS),
            ("MASK", mode),
            # One compiled kernel per shared-memory size: MLX opts a kernel in to more than 48 KiB
            # only at its first launch, so sizes must not share one.
            ("LG", floats),
        ],
        grid=(B * H * L * _ATTEND_THREADS, 1, 1),
        threadgroup=(_ATTEND_THREADS, 1, 1),
        output_shapes=[(B, L, H * d), (B, H, L)],
        output_dtypes=[out_dtype, mx.float32],
    )
    return out, mass
