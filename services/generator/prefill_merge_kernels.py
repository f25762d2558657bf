"""CUDA sources of a prefill's merge (prefill_attention.py, docs/architecture.md "Prefill with
memories"): each query row's log-sum-exp of its local logits, then its memories' softmax weights
against it and the weighted sum. MERGE_LOGITS reads the logits of a float32 matmul; MERGE_MMA
computes them from 16-bit queries and keys by tensor-core products (kernel_parts.MMA_HEADER).
"""

from __future__ import annotations

import functools

import mlx.core as mx

from services.generator import kernel_parts

# The merge of a prefill on CUDA: each (b, h, l) query row's log-sum-exp of its local logits
# (masked: causal by position, or the [B, L, S] bool array), then the softmax weights of the
# memories against it and the weighted sum. Two kernels differ in where the log-sum-exp comes
# from: MERGE_LOGITS reads the float32 logits of a matmul (one warp per query row, lane i taking
# columns i, i + 32, ...); MERGE_MMA computes them itself, 16 query rows of one head per block
# (its T / 32 warps split the key positions, then the rows' merges) by tensor-core products of
# 16-bit queries and keys (kernel_parts.MMA_HEADER), so that a
# 16-bit model's prefill needs no float32 copies of q and k and no logits in memory
# (docs/architecture.md, "Prefill with memories"). Both then take MERGE_ROW per query row.
# inputs: logits [B, KVH, rep * L, S] float32 (q . k, unscaled; MERGE_LOGITS) or q [B, H, L, D]
# and k [B, KVH, S, D] (MERGE_MMA, any strides), mask [B, L, S] bool (MASK == 2; else
# unused), local [B, H, L, D] (the fused attention's output), mem_rows / mem_dots [B, H, L, K],
# bank_values [KVH, N, D] (contiguous), scale [1] float32. outputs: out [B, L, H * D], mass
# [B, H, L] float32. Inputs other than the bank's values and the mask (fused_attention.mask_mode
# makes it contiguous) are read through their strides.
# An online log-sum-exp (m, s): s = sum exp(x - m) over the values added, m = -inf while none.
LSE_HEADER = r"""
__device__ __forceinline__ void em_lse_add(float& m, float& s, float x) {
  if (x > m) { s = s * expf(m - x) + 1.f; m = x; }
  else s += expf(x - m);
}

// (m, s) joined with another lane's (om, os).
__device__ __forceinline__ void em_lse_merge(float& m, float& s, float om, float os) {
  const float neg_inf = __int_as_float(0xff800000);
  const float top = fmaxf(m, om);
  s = (m == neg_inf ? 0.f : s * expf(m - top)) + (om == neg_inf ? 0.f : os * expf(om - top));
  m = top;
}

// The log-sum-exp; with nothing added (no allowed local position) a finite "log 0", as the
// element-wise path's masked logits give.
__device__ __forceinline__ float em_lse(float m, float s) {
  return m == __int_as_float(0xff800000) ? -1e30f : m + logf(s);
}
"""

MERGE_LOGITS = """
  const int H = local_shape[1];
  const int L = local_shape[2];
  const int KVH = logits_shape[1];
  const int S = logits_shape[3];
  const int K = mem_rows_shape[3];
  const int N = bank_values_shape[1];
  const int rep = H / KVH;
  const int B = local_shape[0];
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * (T / 32) + (threadIdx.x >> 5);
  if (row >= B * H * L) return;  // whole warps only: no block barrier below
  const int b = row / (H * L);
  const int h = (row / L) % H;
  const int l = row % L;
  const int g = h / rep;
  const float sc = scale[0];
  const float NEG_INF = __int_as_float(0xff800000);
  const int local_end = MASK == 1 ? min(S, S - L + l + 1) : S;

  // Online log-sum-exp of the allowed local logits: (m, s) with s = sum exp(x - m).
  const float* lr = logits + (size_t)b * logits_strides[0] + (size_t)g * logits_strides[1]
      + ((size_t)(h % rep) * L + l) * logits_strides[2];
  float m = NEG_INF, sum = 0.f;
  for (int p = lane; p < local_end; p += 32) {
    if (MASK == 2 && !mask[((size_t)b * L + l) * S + p]) continue;
    em_lse_add(m, sum, lr[(size_t)p * logits_strides[3]] * sc);
  }
  for (int o = 16; o > 0; o >>= 1)
    em_lse_merge(m, sum, __shfl_xor_sync(0xffffffff, m, o), __shfl_xor_sync(0xffffffff, sum, o));
  const float lse = em_lse(m, sum);
  {
"""

MERGE_MMA = """
  const int B = q_shape[0];
  const int H = q_shape[1];
  const int L = q_shape[2];
  const int KVH = k_shape[1];
  const int S = k_shape[2];
  const int K = mem_rows_shape[3];
  const int N = bank_values_shape[1];
  const int rep = H / KVH;
  constexpr int W = T / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int tiles = (L + 15) / 16;
  const int b = blockIdx.x / (H * tiles);  // the grid has exactly B * H * tiles blocks
  const int h = (blockIdx.x / tiles) % H;
  const int l0 = (blockIdx.x % tiles) * 16;
  const int g = h / rep;
  const int gid = lane >> 2, tig = lane & 3;
  const float sc = scale[0];
  const float NEG_INF = __int_as_float(0xff800000);

  // Pairs of adjacent elements in one 4-byte load where they are aligned words, else two loads.
  const Tq* qb = q + (size_t)b * q_strides[0] + (size_t)h * q_strides[1];
  const Tq* kb = k + (size_t)b * k_strides[0] + (size_t)g * k_strides[1];
  const bool q4 = em_whole_pairs(qb, q_strides, 4);
  const bool k4 = em_whole_pairs(kb, k_strides, 4);
  // The block's query rows l0 ... l0 + 15 as the product's A tiles (rows past L are zeros); every
  // warp holds them all.
  unsigned a[D / 16][4];
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int lq = l0 + gid + (r & 1) * 8;
      const Tq* qe = qb + (size_t)lq * q_strides[2] + (size_t)(ks * 16 + tig * 2 + (r >> 1) * 8) * q_strides[3];
      a[ks][r] = lq < L ? em_load_pair(qe, q_strides[3], q4) : 0u;
    }
  }
  // Logits of 8 local positions at a time, warp w taking the positions 8 w ... 8 w + 7, then every
  // W-th group of 8 after them: this lane keeps the online log-sum-exp (m, s) of its two rows
  // (l0 + gid, l0 + gid + 8) over its columns; the row's 4 lanes combine theirs, then the W warps.
  const int last = min(L, l0 + 16) - 1;
  const int end = MASK == 1 ? min(S, S - L + last + 1) : S;
  float m[2] = {NEG_INF, NEG_INF}, s[2] = {0.f, 0.f};
  for (int n0 = warp * 8; n0 < end; n0 += 8 * W) {
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    const int n = n0 + gid;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      unsigned kf[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const Tq* ke = kb + (size_t)n * k_strides[2] + (size_t)(ks * 16 + tig * 2 + r * 8) * k_strides[3];
        kf[r] = n < S ? em_load_pair(ke, k_strides[3], k4) : 0u;
      }
      em_mma_16816<BF>(c, a[ks], kf);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int i = j >> 1;
      const int lq = l0 + gid + i * 8;
      const int p = n0 + tig * 2 + (j & 1);
      bool ok = lq < L && p < S;
      if (MASK == 1) ok = ok && p <= S - L + lq;
      if (MASK == 2) ok = ok && mask[((size_t)b * L + lq) * S + p];
      if (ok) em_lse_add(m[i], s[i], c[j] * sc);
    }
  }
  __shared__ float part_m[W][16];
  __shared__ float part_s[W][16];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    for (int o = 1; o < 4; o <<= 1)
      em_lse_merge(m[i], s[i], __shfl_xor_sync(0xffffffff, m[i], o), __shfl_xor_sync(0xffffffff, s[i], o));
    if (tig == 0) {
      part_m[warp][gid + i * 8] = m[i];
      part_s[warp][gid + i * 8] = s[i];
    }
  }
  __syncthreads();
  // Warp w merges the memories of rows w, w + W, ...: the block's 16 rows spread over its warps.
  for (int i = warp; i < 16 && l0 + i < L; i += W) {  // the same bound in every lane
    const int l = l0 + i;
    const int row = (b * H + h) * L + l;
    float rm = NEG_INF, rs = 0.f;
    for (int w = 0; w < W; ++w) em_lse_merge(rm, rs, part_m[w][i], part_s[w][i]);
    const float lse = em_lse(rm, rs);
"""

# One query row (b, h, l) = row of [B, H, L], its KV head g and local log-sum-exp lse: the
# memories' weights against it (lane j < K holds memory j), the weighted sum, the outputs.
MERGE_ROW = """
    const size_t mi =
        (size_t)b * mem_rows_strides[0] + (size_t)h * mem_rows_strides[1] + (size_t)l * mem_rows_strides[2];
    const size_t di =
        (size_t)b * mem_dots_strides[0] + (size_t)h * mem_dots_strides[1] + (size_t)l * mem_dots_strides[2];
    const int n_j = lane < K ? mem_rows[mi + (size_t)lane * mem_rows_strides[3]] : -1;
    const float x_j = n_j >= 0 ? mem_dots[di + (size_t)lane * mem_dots_strides[3]] * sc : NEG_INF;
    float top = fmaxf(lse, x_j);
    for (int o = 16; o > 0; o >>= 1) top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, o));
    const float e_j = n_j >= 0 ? expf(x_j - top) : 0.f;
    float e_sum = e_j;
    for (int o = 16; o > 0; o >>= 1) e_sum += __shfl_xor_sync(0xffffffff, e_sum, o);
    const float w_local = expf(lse - top);
    const float z = w_local + e_sum;  // >= 1: one of the terms is exp(0)

    constexpr int E = (D + 31) / 32;
    const size_t li = (size_t)b * local_strides[0] + (size_t)h * local_strides[1] + (size_t)l * local_strides[2];
    float acc[E];
#pragma unroll
    for (int u = 0; u < E; ++u) {
      const int e = lane + 32 * u;
      // A row with no allowed local position weighs the local output 0, whatever it holds.
      acc[u] = (e < D && w_local > 0.f) ? w_local * static_cast<float>(local[li + (size_t)e * local_strides[3]]) : 0.f;
    }
    // G memories' values at a time: their loads in flight together, then added in order (one
    // memory at a time, each load was waited on in turn).
    for (int j0 = 0; j0 < K; j0 += G) {
      float w[G], x[G][E];
      bool use[G];
#pragma unroll
      for (int t = 0; t < G; ++t) {
        const int j = min(j0 + t, 31);  // K <= 32: the lanes hold the memories
        w[t] = __shfl_sync(0xffffffff, e_j, j);
        const int n = __shfl_sync(0xffffffff, n_j, j);
        use[t] = j0 + t < K && n >= 0;
        const Tv* vr = bank_values + ((size_t)g * N + (use[t] ? n : 0)) * D;
#pragma unroll
        for (int u = 0; u < E; ++u) {
          const int e = lane + 32 * u;
          x[t][u] = use[t] && e < D ? static_cast<float>(vr[e]) : 0.f;
        }
      }
#pragma unroll
      for (int t = 0; t < G; ++t) {
        if (!use[t]) continue;
#pragma unroll
        for (int u = 0; u < E; ++u) {
          const int e = lane + 32 * u;
          if (e < D) acc[u] += w[t] * x[t][u];
        }
      }
    }
#pragma unroll
    for (int u = 0; u < E; ++u) {
      const int e = lane + 32 * u;
      if (e < D) out[(((size_t)b * L + l) * H + h) * D + e] = static_cast<To>(acc[u] / z);
    }
    if (lane == 0) mass[row] = e_sum / z;
  }
"""

THREADS = 128
# Memories whose values a warp loads together in the merge (the kernels' G); 1: one at a time
# (bench A/B).
MERGE_GROUP = 4


@functools.cache
def merge_kernel(mma: bool = False):
    """The merge kernel: from the float32 logits, or (``mma``) computing them from 16-bit q and k."""
    first = ["q", "k"] if mma else ["logits"]
    return mx.fast.cuda_kernel(
        name="extmind_prefill_merge_mma" if mma else "extmind_prefill_merge",
        input_names=[*first, "mask", "local", "mem_rows", "mem_dots", "bank_values", "scale"],
        output_names=["out", "mass"],
        source=(MERGE_MMA if mma else MERGE_LOGITS) + MERGE_ROW,
        header=(kernel_parts.MMA_HEADER if mma else "") + LSE_HEADER,
        ensure_row_contiguous=False,
    )
