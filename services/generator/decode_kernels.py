"""The CUDA sources of the fused decode kernels (``fused_attention``: the top-k scan, its merge,
and the attend kernel in its three forms) and the MLX kernel objects made from them, once each.
The host side (which kernel a call takes, launch shapes, constants) is ``fused_attention``; the
device functions they share are ``kernel_parts``. Design: docs/architecture.md, "Fused extended
attention (CUDA)"."""

from __future__ import annotations

import functools

import mlx.core as mx

from services.generator import kernel_parts

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
TOPK_SCAN_SOURCE = """
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
TOPK_MERGE_SOURCE = """
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
#   the other warps start on the local logits; after the softmax the outputs rows / dots
#   [B, H, L, K] get them as ``top_k_rows`` would, with one more input, min_weight [1] float32:
#   a row whose softmax weight is below it is -1 in ``rows`` (ATTEND_PICKS).
# outputs: out [B, L, H * D], mass [B, H, L] float32 (and rows, dots when MERGE == 1).
ATTEND_HEAD = """
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

ATTEND_ROWS = """
  const int K = mem_rows_shape[3];
  const int total = K + S;
  for (int j = tid; j < K; j += T) {
    mrow[j] = mem_rows[(size_t)row * K + j];
    mdot[j] = mem_dots[(size_t)row * K + j];
  }
  __syncthreads();
"""


def _merge_to_rows(candidates: str, count: str) -> str:
    """Source: warp 0 takes the row's top-K of ``count`` candidates (``candidates``: their cosines,
    rows and raw dots, as em_merge_candidates takes them) into mrow / mdot (ATTEND_PICKS writes
    them out after the softmax)."""
    return f"""
  if (warp == 0) {{
    int r;
    float dot;
    em_merge_candidates<KL>({candidates}, {count}, K, threshold[0], r, dot);
    if (lane < K) {{
      mrow[lane] = r;
      mdot[lane] = dot;
    }}
  }}
"""


ATTEND_MERGE = """
  const int K = cand_s_shape[2];
  const int total = K + S;
  const int CK = cand_s_shape[1] * K;
  const size_t at = (size_t)row * CK;
  __syncthreads();
""" + _merge_to_rows("cand_s + at, cand_i + at, cand_d + at", "CK")

# - SCAN: the block takes the row's top-K itself (no scan launch before it, for a bank small
#   enough that every query row may read all of it): inputs keys_t [KVH, D, N] (Tk), inv_norms
#   [KVH, N] float32, topk [1] int32 (K = min(top_k, N)), threshold [1] float32; warp w scans the
#   w-th chunk of the bank's rows as the scan kernel's warps do (same cosines, same lists of size KL,
#   runs of R rows, VEC loads), writes its top-K to shared memory, and after a barrier warp 0
#   merges the W * K candidates while the other warps start on the local logits; rows / dots as
#   for MERGE.
ATTEND_SCAN = """
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
""" + _merge_to_rows("scan_s, scan_i, scan_d", "W * K")

# One warp per local position, four at a time: lane i multiplies columns i, i + 32, ... (a row is
# one coalesced read, where a thread per position reads a line per column), four rows' loads are
# in flight before the shuffles sum them. Then (after a barrier: warp 0 may have been merging) the
# memories' logits.
ATTEND_LOGITS_WARP = """
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

ATTEND_TAIL = """
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

# The kernel that took the row's top-K writes it out (MERGE == 1 and SCAN): the raw dots, and the
# rows the citations count: -1 where the threshold masked the memory or its softmax weight
# (lg[j] / denom, as ``citations.memory_weights`` rebuilds it) is below min_weight (0: none
# is), so a flush joins rows alone, not rows, dots and mass and their weights.
ATTEND_PICKS = """
  for (int j = tid; j < K; j += T) {
    rows[(size_t)row * K + j] = mrow[j] >= 0 && lg[j] >= min_weight[0] * denom ? mrow[j] : -1;
    dots[(size_t)row * K + j] = mdot[j];
  }
"""


# The kernel objects, one per set of template arguments (``template``: (name, value) pairs), baked
# into the source (kernel_parts.baked): the launches pass none. Bounded: a process sees a few
# shapes, and MLX keeps each compiled kernel anyway.
_KERNELS = 256


@functools.lru_cache(maxsize=_KERNELS)
def topk_scan_kernel(template: tuple):
    return mx.fast.cuda_kernel(
        name=kernel_parts.kernel_name("extmind_topk_chunks", template),
        input_names=["q", "keys_t", "inv_norms", "topk", "chunks"],
        output_names=["cand_s", "cand_i", "cand_d"],
        source=kernel_parts.baked(template, TOPK_SCAN_SOURCE),
        header=kernel_parts.HEADER + kernel_parts.TOPK_HEADER,
    )


@functools.lru_cache(maxsize=_KERNELS)
def topk_merge_kernel(template: tuple):
    return mx.fast.cuda_kernel(
        name=kernel_parts.kernel_name("extmind_topk_merge", template),
        input_names=["threshold", "cand_s", "cand_i", "cand_d"],
        output_names=["rows", "dots"],
        source=kernel_parts.baked(template, TOPK_MERGE_SOURCE),
        header=kernel_parts.HEADER + kernel_parts.TOPK_HEADER,
    )


# How the attend kernel gets a row's memories: "rows" (given), "merge" (the scan's candidates),
# "scan" (it scans the bank itself): (name, memory inputs, source of that part).
ATTEND_MEMORIES = {
    "rows": ("extmind_attend", ["mem_rows", "mem_dots"], ATTEND_ROWS),
    "merge": ("extmind_attend_top_k", ["cand_s", "cand_i", "cand_d"], ATTEND_MERGE),
    "scan": ("extmind_attend_scan", ["keys_t", "inv_norms", "topk"], ATTEND_SCAN),
}


@functools.lru_cache(maxsize=_KERNELS)
def attend_kernel(shared_floats: int, memories: str, template: tuple):
    name, inputs, part = ATTEND_MEMORIES[memories]
    picks = memories != "rows"  # takes the top-k itself: writes rows / dots, reads the threshold and floor
    source = ATTEND_HEAD + part + ATTEND_LOGITS_WARP + ATTEND_TAIL + (ATTEND_PICKS if picks else "")
    return mx.fast.cuda_kernel(
        name=kernel_parts.kernel_name(name, template),
        input_names=["q", "k", "v", "mask", *inputs, "bank_values", "scale"]
        + (["threshold", "min_weight"] if picks else []),
        output_names=["out", "mass", *(["rows", "dots"] if picks else [])],
        source=kernel_parts.baked(template, source),
        header=kernel_parts.HEADER + (kernel_parts.TOPK_HEADER if picks else ""),
        ensure_row_contiguous=False,
        shared_memory=4 * shared_floats,
    )
