"""Extended mind attention of one layer in two kernels, on MLX's CUDA backend.

The portable path (``ExtendedMindAttention._with_memories`` over ``local_top_k``) runs about twenty
small kernels per layer: the cosine matmul, norms, a two-stage partition, gathers, the local
logits, the mask, a concatenation, the softmax and two weighted sums. On a fast GPU each costs
more in launch and latency than in arithmetic, so LOCAL decode spent most of its step waiting on
them (docs/architecture.md, "Fused extended attention"). Here the same computation is two steps:

- the top-k: per query head and token, the exact cosine top-k over the bank's rows (each lane of a
  warp scans a stripe of rows, for the query heads of one KV head at once, and keeps each head's
  sorted top-k; the warp merges them by shuffles; a decode row's scan is split in chunks, whose
  candidates one warp merges; a prefill's scores come from one matmul instead, ranked in
  ``prefill_top_k``), the raw dot products of the winners and the threshold (``top_k_rows``);
- ``attend``: per query head and token, one softmax over [memory logits | local logits] (causal,
  array-masked or unmasked) and the weighted sum of the memory values (read from the bank by row)
  and the local values (read from the KV cache in place, strides and all), written straight in the
  [B, L, H * d] layout ``o_proj`` takes, plus the attention mass on the memories.

``attend_top_k`` runs both for a layer: for a decode step the attend kernel merges the scan's
candidates itself, so a layer is two launches (a launch costs the host more than the GPU here).
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
_TOPK_THREADS = 128  # four independent warps per block
_ROWS_PER_LANE = 4  # bank rows each scan lane takes at least, when a tile's scan is split
_RUN = 4  # adjacent bank rows a scan lane takes at a time (R)
_FILL_WARPS = 4096  # scan warps that keep an H100/H200 (132 SMs) busy
_MERGE_CANDIDATES = 1024  # most candidates per query row the merge warp takes (32 per lane)
MATMUL_ROWS = 2048  # query rows (B * H * L) from which the cosines come from one matmul
# Bank rows up to which a decode layer is one launch: the attend kernel's block scans the whole bank
# for its query row. Its GPU time grows with the rows one block scans (H200, 1 B shape: 30 us per
# layer at 4 096 rows, 46 at 8 192, 77 at 16 384, against 28-42 us for the scan kernel, whose warps
# share key columns among a KV head's query heads and split a row's scan over many blocks), while a
# launch less saves the host 10-20 us per layer (bench/RESULTS.md, 2026-12-01 20:35).
SCAN_IN_ATTEND = 8192
_ATTEND_THREADS = 256
_NO_MASK, _CAUSAL, _ARRAY_MASK = 0, 1, 2


# The top-k: a scan kernel, one warp per (tile of query heads, token, chunk of the bank's rows):
# each lane keeps, for each of the tile's GT query heads, the sorted top-k of its stripe of rows in
# registers, and the warp merges its lanes' lists head by head with shuffles (no block barrier:
# the H200 profile showed a block-wide merge, two barriers per pick, costing most of a layer's
# retrieval). The GT heads of a tile share one KV head (GQA), so each key column is read once for
# all of them, not once per query head. A decode step has only B * H query rows, so a tile's rows
# are split in chunks that keep the GPU busy; each chunk writes its candidates (its top-k), and the
# top-k of a query row's candidates is taken by one warp: in the attend kernel when the layer's
# attention follows (``attend_top_k``: one launch less per layer), else in a merge kernel
# (``top_k_rows``).

# Template K is the size of the per-lane lists (8, 16 or 32: one compiled kernel serves every
# top_k up to it, since the top k of a list are the first k of its top K); k <= K comes at run
# time. GT (head_tile) divides H / KVH; T threads per block are T / 32 independent warps. A lane
# scans R adjacent rows at a time, each key column's R elements in one load when VEC (N % R == 0:
# every run is aligned), which puts R times the bytes in flight per load (the 65 536-row scan
# waited on load latency, not on DRAM bandwidth).
# inputs: q [B, H, L, D] (contiguous), keys_t [KVH, D, N], inv_norms [KVH, N] float32, topk [1]
# int32 (k), chunks [1] int32 (C). outputs: each chunk's candidates for each query row, sorted by
# cosine: cand_s [B * H * L, C, k] float32 (the cosines; -inf where the chunk had fewer rows),
# cand_i int32 (rows; -1 there) and cand_d float32 (the raw q . k; 0 there).
_TOPK_SCAN_SOURCE = """
  const int H = q_shape[1];
  const int L = q_shape[2];
  const int KVH = keys_t_shape[0];
  const int N = keys_t_shape[2];
  const int C = chunks[0];
  const int k = topk[0];
  const int lane = threadIdx.x & 31;
  const int w = threadIdx.x >> 5;
  const int unit = blockIdx.x * (T / 32) + w;  // (b, head tile, l, chunk)
  if (unit >= q_shape[0] * (H / GT) * L * C) return;  // a whole warp: no barrier follows
  const int tile = unit / C;
  const int c = unit % C;
  const int b = tile / ((H / GT) * L);
  const int h0 = ((tile / L) % (H / GT)) * GT;
  const int l = tile % L;
  const int g = h0 / (H / KVH);
  // Chunks of whole runs of R rows (a lane takes R adjacent rows at a time).
  const int per = ((N + R - 1) / R + C - 1) / C * R;
  const int lo = c * per;
  const int hi = min(N, lo + per);

  __shared__ float qs_warps[T / 32][GT][D];
  float (*qs)[D] = qs_warps[w];
  for (int e = lane; e < GT * D; e += 32) {
    qs[e / D][e % D] = static_cast<float>(q[(((size_t)b * H + h0 + e / D) * L + l) * D + e % D]);
  }
  __syncwarp();
  float q_inv[GT];
#pragma unroll
  for (int j = 0; j < GT; ++j) {
    float part = 0.f;
    for (int e = lane; e < D; e += 32) part += qs[j][e] * qs[j][e];
    q_inv[j] = rsqrtf(fmaxf(em_warp_sum(part), 1e-24f));
  }

  float s[GT][K];
  int ix[GT][K];
#pragma unroll
  for (int j = 0; j < GT; ++j) {
#pragma unroll
    for (int i = 0; i < K; ++i) { s[j][i] = EM_NEG_INF; ix[j][i] = -1; }
  }
  const Tk* kg = keys_t + (size_t)g * D * N;
  const float* ng = inv_norms + (size_t)g * N;
  for (int n = lo + lane * R; n < hi; n += 32 * R) {
    float dot[GT][R];
    em_dots_rows_t<GT, R, D, VEC, Tk>(qs, kg, N, n, dot);
    float kn[R];
    em_load_run<R, VEC>(ng, n, N, kn);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (n + r < hi) {
#pragma unroll
        for (int j = 0; j < GT; ++j) em_insert<K>(s[j], ix[j], dot[j][r] * q_inv[j] * kn[r], n + r);
      }
    }
  }
  float best_s[GT];
  int best_i[GT];
  em_warp_top_k<GT, K>(s, ix, k, best_s, best_i);
#pragma unroll
  for (int j = 0; j < GT; ++j) {
    const size_t row = ((size_t)b * H + h0 + j) * L + l;
    if (lane < k) {
      const size_t at = (row * C + c) * k + lane;
      cand_s[at] = best_s[j];
      cand_i[at] = best_i[j];
      cand_d[at] = best_i[j] >= 0 ? em_dot_t<D, Tk>(qs[j], kg, N, best_i[j]) : 0.f;
    }
  }
"""

# inputs: threshold [1] float32 and the scan's candidates cand_s / cand_i / cand_d [R, C, k]
# (R = B * H * L query rows). outputs: rows [B, H, L, k] int32 (-1 where the cosine is not above
# the threshold) and dots [B, H, L, k] float32 (raw q . k). One warp per query row.
_TOPK_MERGE_SOURCE = """
  const int k = cand_s_shape[2];
  const int CK = cand_s_shape[1] * k;
  const int row = blockIdx.x * (T / 32) + (threadIdx.x >> 5);
  if (row >= cand_s_shape[0]) return;  // a whole warp: no barrier follows
  const size_t at = (size_t)row * CK;
  int r;
  float dot;
  em_merge_candidates<K>(cand_s + at, cand_i + at, cand_d + at, CK, k, threshold[0], r, dot);
  const int lane = threadIdx.x & 31;
  if (lane < k) {
    rows[(size_t)row * k + lane] = r;
    dots[(size_t)row * k + lane] = dot;
  }
"""

# One block per (b, h, l) query row; dynamic shared memory holds its K + S logits. inputs: q
# [B, H, L, D] (contiguous), k / v [B, KVH, S, D] (any strides: the KV cache in place), mask
# [B, L, S] bool (MASK == 2; else unused), bank_values [KVH, N, D] (contiguous), scale [1] float32,
# and the memories, one of two ways:
# - MERGE == 0: mem_rows / mem_dots [B, H, L, K] (``top_k_rows``);
# - MERGE == 1: the decode scan's candidates cand_s / cand_i / cand_d [B * H * L, C, K] and
#   threshold [1] float32: warp 0 takes the row's top-K of them (template KL: the list size) while
#   the other warps start on the local logits, and writes them to the outputs rows / dots
#   [B, H, L, K] as ``top_k_rows`` would.
# outputs: out [B, L, H * D], mass [B, H, L] float32 (and rows, dots when MERGE == 1).
_ATTEND_HEAD = """
  extern __shared__ float lg[];
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
  __shared__ int mrow[32];  // the row's memories: bank rows (-1: masked) and raw dots
  __shared__ float mdot[32];

  for (int e = tid; e < D; e += T) qs[e] = static_cast<float>(q[(size_t)row * D + e]);
"""

_ATTEND_ROWS = """
  const int K = mem_rows_shape[3];
  const int total = K + S;
  for (int j = tid; j < K; j += T) {
    mrow[j] = mem_rows[(size_t)row * K + j];
    mdot[j] = mem_dots[(size_t)row * K + j];
  }
  __syncthreads();
"""

_ATTEND_MERGE = """
  const int K = cand_s_shape[2];
  const int total = K + S;
  __syncthreads();
  if (warp == 0) {
    const int CK = cand_s_shape[1] * K;
    const size_t at = (size_t)row * CK;
    int r;
    float dot;
    em_merge_candidates<KL>(cand_s + at, cand_i + at, cand_d + at, CK, K, threshold[0], r, dot);
    if (lane < K) {
      mrow[lane] = r;
      mdot[lane] = dot;
      rows[(size_t)row * K + lane] = r;
      dots[(size_t)row * K + lane] = dot;
    }
  }
"""

# - SCAN: the block takes the row's top-K itself (no scan launch before it, for a bank small
#   enough that every query row may read all of it): inputs keys_t [KVH, D, N] (Tk), inv_norms
#   [KVH, N] float32, topk [1] int32 (K = min(top_k, N)), threshold [1] float32; warp w scans the
#   w-th chunk of the bank's rows as the scan kernel's warps do (same cosines, same lists of size KL,
#   runs of R rows, VEC loads), writes its top-K to shared memory, and after a barrier warp 0
#   merges the W * K candidates while the other warps start on the local logits; rows / dots as
#   for MERGE.
_ATTEND_SCAN = """
  const int K = topk[0];
  const int total = K + S;
  __shared__ float scan_s[W * KL];
  __shared__ int scan_i[W * KL];
  __shared__ float scan_d[W * KL];
  __syncthreads();
  {
    float part = 0.f;
    for (int e = lane; e < D; e += 32) part += qs[e] * qs[e];
    const float q_inv = rsqrtf(fmaxf(em_warp_sum(part), 1e-24f));
    const int per = ((N + R - 1) / R + W - 1) / W * R;  // whole runs of R rows per warp
    const int lo = warp * per;
    const int hi = min(N, lo + per);
    float s[1][KL];
    int ix[1][KL];
#pragma unroll
    for (int i = 0; i < KL; ++i) { s[0][i] = EM_NEG_INF; ix[0][i] = -1; }
    const Tk* kg = keys_t + (size_t)g * D * N;
    const float* ng = inv_norms + (size_t)g * N;
    const float (*q1)[D] = reinterpret_cast<const float (*)[D]>(qs);
    for (int n = lo + lane * R; n < hi; n += 32 * R) {
      float dot[1][R];
      em_dots_rows_t<1, R, D, VEC, Tk>(q1, kg, N, n, dot);
      float kn[R];
      em_load_run<R, VEC>(ng, n, N, kn);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (n + r < hi) em_insert<KL>(s[0], ix[0], dot[0][r] * q_inv * kn[r], n + r);
      }
    }
    float best_s[1];
    int best_i[1];
    em_warp_top_k<1, KL>(s, ix, K, best_s, best_i);
    if (lane < K) {
      scan_s[warp * K + lane] = best_s[0];
      scan_i[warp * K + lane] = best_i[0];
      scan_d[warp * K + lane] = best_i[0] >= 0 ? em_dot_t<D, Tk>(qs, kg, N, best_i[0]) : 0.f;
    }
  }
  __syncthreads();
  if (warp == 0) {
    int r;
    float dot;
    em_merge_candidates<KL>(scan_s, scan_i, scan_d, W * K, K, threshold[0], r, dot);
    if (lane < K) {
      mrow[lane] = r;
      mdot[lane] = dot;
      rows[(size_t)row * K + lane] = r;
      dots[(size_t)row * K + lane] = dot;
    }
  }
"""

# One warp per local position, four at a time: lane i multiplies columns i, i + 32, ... (a row is
# one coalesced read, where a thread per position reads a line per column), four rows' loads are
# in flight before the shuffles sum them. Then (after a barrier: warp 0 may have been merging) the
# memories' logits.
_ATTEND_LOGITS_WARP = """
  const size_t kb = (size_t)b * k_strides[0] + (size_t)g * k_strides[1];
  float mx_local = EM_NEG_INF;
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
  __syncthreads();
  for (int j = tid; j < K; j += T) {
    const float x = mrow[j] >= 0 ? mdot[j] * sc : EM_NEG_INF;
    lg[j] = x;
    mx_local = fmaxf(mx_local, x);
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
    const int r = max(mrow[j], 0);  // a masked row has p == 0
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
def _topk_scan_kernel():
    return mx.fast.cuda_kernel(
        name="extmind_topk_chunks",
        input_names=["q", "keys_t", "inv_norms", "topk", "chunks"],
        output_names=["cand_s", "cand_i", "cand_d"],
        source=_TOPK_SCAN_SOURCE,
        header=kernel_parts.HEADER + kernel_parts.TOPK_HEADER,
    )


@functools.cache
def _topk_merge_kernel():
    return mx.fast.cuda_kernel(
        name="extmind_topk_merge",
        input_names=["threshold", "cand_s", "cand_i", "cand_d"],
        output_names=["rows", "dots"],
        source=_TOPK_MERGE_SOURCE,
        header=kernel_parts.HEADER + kernel_parts.TOPK_HEADER,
    )


# How the attend kernel gets a row's memories: "rows" (given), "merge" (the scan's candidates),
# "scan" (it scans the bank itself): (name, memory inputs, source of that part).
_ATTEND_MEMORIES = {
    "rows": ("extmind_attend", ["mem_rows", "mem_dots"], _ATTEND_ROWS),
    "merge": ("extmind_attend_top_k", ["cand_s", "cand_i", "cand_d"], _ATTEND_MERGE),
    "scan": ("extmind_attend_scan", ["keys_t", "inv_norms", "topk"], _ATTEND_SCAN),
}


@functools.cache
def _attend_kernel(shared_floats: int, memories: str = "rows"):
    name, inputs, part = _ATTEND_MEMORIES[memories]
    picks = memories != "rows"  # takes the top-k itself: writes rows / dots, reads the threshold
    return mx.fast.cuda_kernel(
        name=name,
        input_names=["q", "k", "v", "mask", *inputs, "bank_values", "scale", *(["threshold"] if picks else [])],
        output_names=["out", "mass", *(["rows", "dots"] if picks else [])],
        source=_ATTEND_HEAD + part + _ATTEND_LOGITS_WARP + _ATTEND_TAIL,
        header=kernel_parts.HEADER + (kernel_parts.TOPK_HEADER if picks else ""),
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


def chunks_for(tiles: int, n: int, k: int) -> int:
    """How many warps share one tile's scan of an ``n``-row bank (a tile: ``head_tile`` query
    heads of one token): enough warps to fill the GPU (a decode step has only B * H query rows),
    at least ``_ROWS_PER_LANE`` rows per lane, and at most ``_MERGE_CANDIDATES`` candidates
    (chunks * k) for the merge's one warp per query row to read (the H200 profile: 5 120
    candidates per row took the merge longer than the scan)."""
    if tiles >= _FILL_WARPS:
        return 1
    most = max(1, min(n // (32 * _ROWS_PER_LANE), _MERGE_CANDIDATES // max(k, 1)))
    return max(1, min(most, -(-_FILL_WARPS // tiles)))


def head_tile(n_heads: int, n_kv_heads: int, list_size: int) -> int:
    """How many query heads of one KV head a scan warp ranks together (GQA: they read each key
    column once): the largest divisor of ``n_heads // n_kv_heads`` whose per-lane lists
    (tile * list_size scores and rows in registers) stay within 64 entries."""
    group = n_heads // n_kv_heads
    return max(t for t in range(1, group + 1) if group % t == 0 and t * list_size <= 64)


def _threshold(threshold: float | None) -> mx.array:
    return kernel_parts.scalar(float(threshold) if threshold is not None else -math.inf, mx.float32)


def _check(k: int, d: int) -> None:
    if k > MAX_TOP_K or d > MAX_HEAD_DIM:
        raise ValueError(f"the fused kernels take k <= {MAX_TOP_K} and head size <= {MAX_HEAD_DIM}")


@functools.lru_cache(maxsize=256)
def _scan_call(B: int, H: int, L: int, kvh: int, d: int, n: int, top_k: int, dtype) -> tuple:
    """The decode scan's launch for these shapes, made once (a decode step repeats it for every
    layer, and the host's time per layer is what a fast GPU waits on): (its call's keyword
    arguments, its constant inputs, k, list size)."""
    k = min(top_k, n)
    _check(k, d)
    size = list_size(k)
    rows = B * H * L
    gt = head_tile(H, kvh, size)
    c = chunks_for(rows // gt, n, k)
    units = rows // gt * c  # one warp each
    call = dict(
        template=[("Tk", dtype), ("D", d), ("K", size), ("T", _TOPK_THREADS), ("GT", gt)]
        + [("R", _RUN), ("VEC", n % _RUN == 0)],
        grid=(-(-units // (_TOPK_THREADS // 32)) * _TOPK_THREADS, 1, 1),
        threadgroup=(_TOPK_THREADS, 1, 1),
        output_shapes=[(rows, c, k)] * 3,
        output_dtypes=[mx.float32, mx.int32, mx.float32],
    )
    return call, (kernel_parts.scalar(k, mx.int32), kernel_parts.scalar(c, mx.int32)), k, size


def _scan(q: mx.array, keys_t: mx.array, inv_norms: mx.array, top_k: int):
    """(the scan's candidates cand_s, cand_i, cand_d [B * H * L, C, k], k, list size); q contiguous."""
    B, H, L, d = q.shape
    call, consts, k, size = _scan_call(B, H, L, keys_t.shape[0], d, keys_t.shape[2], top_k, keys_t.dtype)
    return _topk_scan_kernel()(inputs=[q, keys_t, inv_norms, *consts], **call), k, size


def top_k_rows(q: mx.array, keys_t: mx.array, inv_norms: mx.array, top_k: int, threshold: float | None):
    """Exact cosine top-k of every query head and token over one layer's bank.

    q [B, H, L, d] (rotated queries, any float dtype); keys_t [KVH, d, N] and inv_norms [KVH, N]
    float32 as ``bank_cache.Bank`` holds them. Returns (rows [B, H, L, k] int32, -1 where the
    cosine is not above ``threshold``; dots [B, H, L, k] float32, the raw q . k), k = min(top_k, N),
    rows in descending cosine. Ties at the k-th place may pick either row. Raises ValueError for
    k > MAX_TOP_K or d > MAX_HEAD_DIM."""
    B, H, L, d = q.shape
    k = min(top_k, keys_t.shape[2])
    _check(k, d)
    q = mx.contiguous(q)
    thr = _threshold(threshold)
    if B * H * L >= MATMUL_ROWS:
        # Many query rows (prefill): each scan warp would read the whole bank once per row;
        # one matmul reads it once, and prefill_top_k ranks its scores.
        return prefill_top_k.top_k_rows(q, keys_t, inv_norms, k, list_size(k), thr)
    cand, k, size = _scan(q, keys_t, inv_norms, top_k)
    rows = B * H * L
    rows_out, dots = _topk_merge_kernel()(
        inputs=[thr, *cand],
        template=[("K", size), ("T", _TOPK_THREADS)],
        grid=(-(-rows // (_TOPK_THREADS // 32)) * _TOPK_THREADS, 1, 1),
        threadgroup=(_TOPK_THREADS, 1, 1),
        output_shapes=[(B, H, L, k), (B, H, L, k)],
        output_dtypes=[mx.int32, mx.float32],
    )
    return rows_out, dots


def list_size(k: int) -> int:
    """The compiled list size serving a top-k of ``k`` (<= MAX_TOP_K): 8, 16 or 32."""
    return 8 if k <= 8 else 16 if k <= 16 else 32


@functools.lru_cache(maxsize=256)
def _attend_call(
    B, H, L, d, floats, mode, kv_dtype, values_dtype, out_dtype, size: int = 0, k: int = 0, scan: tuple = ()
) -> dict:
    """The attend kernel's launch for these shapes (``size``: the list size of the top-k it takes
    and ``k`` the memories per query, 0 when the memories come as rows and dots; ``scan``: (the
    bank keys' dtype, whether N % _RUN == 0) when it scans the bank itself), made once: its call's
    keyword arguments."""
    merge = size > 0
    template = [("Tkv", kv_dtype), ("Tv", values_dtype), ("To", out_dtype), ("D", d), ("T", _ATTEND_THREADS)]
    # One compiled kernel per shared-memory size: MLX opts a kernel in to more than 48 KiB of
    # shared memory only at its first launch, so sizes must not share one.
    template += [("MASK", mode), ("LG", floats), *([("KL", size)] if merge else [])]
    if scan:
        template += [("Tk", scan[0]), ("R", _RUN), ("VEC", scan[1])]
    return dict(
        template=template,
        grid=(B * H * L * _ATTEND_THREADS, 1, 1),
        threadgroup=(_ATTEND_THREADS, 1, 1),
        output_shapes=[(B, L, H * d), (B, H, L), *([(B, H, L, k)] * 2 if merge else [])],
        output_dtypes=[out_dtype, mx.float32, *([mx.int32, mx.float32] if merge else [])],
    )


def attend(q, k, v, mask, mem_rows, mem_dots, bank_values, scale: float, out_dtype):
    """One softmax over [memories | local context] for every query head and token.

    q [B, H, L, d] rotated queries; k, v [B, KVH, S, d] the local keys (rotated) and values, any
    strides; ``mask`` as ``mask_mode`` returns it; mem_rows / mem_dots [B, H, L, k] from
    ``top_k_rows``; bank_values [KVH, N, d] the bank's values, contiguous (as bank_cache holds
    them: the kernel indexes them so). Returns (out [B, L, H * d] in ``out_dtype``, mass
    [B, H, L] float32: each head's attention weight on its memories).
    Raises ValueError for k > MAX_TOP_K or d > MAX_HEAD_DIM."""
    B, H, L, d = q.shape
    _check(mem_rows.shape[-1], d)
    mode, mask_arr = mask
    floats = _shared_bucket(mem_rows.shape[-1] + k.shape[2])
    call = _attend_call(B, H, L, d, floats, mode, k.dtype, bank_values.dtype, out_dtype)
    scale_c = kernel_parts.scalar(float(scale), mx.float32)
    inputs = [mx.contiguous(q), k, v, mask_arr, mem_rows, mem_dots, bank_values, scale_c]
    out, mass = _attend_kernel(floats)(inputs=inputs, **call)
    return out, mass


def attend_top_k(q, k, v, mask, keys_t, inv_norms, bank_values, top_k: int, threshold, scale: float, out_dtype):
    """Retrieval and attention of one layer: for a decode step one kernel (the attend kernel's
    block scans the bank for its query row: N <= SCAN_IN_ATTEND) or two (the scan, then
    the attend kernel takes the top-k of the scan's candidates itself); ``top_k_rows`` +
    ``attend`` for a batch of query rows past MATMUL_ROWS. The top-k is exact on every path (ties
    at the k-th place may pick either row).

    Arguments as ``top_k_rows`` and ``attend`` take them. Returns (out [B, L, H * d] in
    ``out_dtype``, mass [B, H, L] float32, rows [B, H, L, k] int32, dots [B, H, L, k] float32),
    each as those two return it. Raises ValueError for k > MAX_TOP_K or d > MAX_HEAD_DIM."""
    B, H, L, d = q.shape
    if B * H * L >= MATMUL_ROWS:
        rows, dots = top_k_rows(q, keys_t, inv_norms, top_k, threshold)
        return (*attend(q, k, v, mask, rows, dots, bank_values, scale, out_dtype), rows, dots)
    q = mx.contiguous(q)
    mode, mask_arr = mask
    scale_c = kernel_parts.scalar(float(scale), mx.float32)
    n = keys_t.shape[2]
    if n <= SCAN_IN_ATTEND:
        kk = min(top_k, n)
        _check(kk, d)
        floats = _shared_bucket(kk + k.shape[2])
        scan = (keys_t.dtype, n % _RUN == 0)
        call = _attend_call(B, H, L, d, floats, mode, k.dtype, bank_values.dtype, out_dtype, list_size(kk), kk, scan)
        topk = kernel_parts.scalar(kk, mx.int32)
        inputs = [q, k, v, mask_arr, keys_t, inv_norms, topk, bank_values, scale_c, _threshold(threshold)]
        return _attend_kernel(floats, "scan")(inputs=inputs, **call)
    cand, kk, size = _scan(q, keys_t, inv_norms, top_k)
    floats = _shared_bucket(kk + k.shape[2])
    call = _attend_call(B, H, L, d, floats, mode, k.dtype, bank_values.dtype, out_dtype, size, kk)
    inputs = [q, k, v, mask_arr, *cand, bank_values, scale_c, _threshold(threshold)]
    return _attend_kernel(floats, "merge")(inputs=inputs, **call)
