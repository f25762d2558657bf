"""The exact cosine top-k of a prefill's 16-bit queries over a bank of the same dtype, on CUDA, in one
kernel: the scores come from tensor-core products computed where they are used, not from a matmul
written to memory (docs/architecture.md, "Prefill with memories").

``prefill_top_k`` ranks a matmul's [KVH, B * rep * L, N] approximate scores: per layer of a 511-token
prefill over 4 096 rows that is 134 MB of float16 written and read, four launches (unit keys, the
matmul, a row-major copy of the keys, the kernel), and on the H200 ~150 us of the GPU. Here a warp
takes 16 query rows of one head (positions l0 ... l0 + 15) and the bank's keys 8 at a time:

1. Scores: q . k_n of each row and key from ``mma.m16n8k16`` (kernel_parts.MMA_HEADER; float32
   accumulators, products of 16-bit values exact), times the key's inverse norm: s_n, |q| times an
   approximate cosine. The float32 accumulation errs by far less than ``prefill_top_k.APPROX_E``
   times |q| (at most D * 2^-23 of |q| |k_n|), the bound both kernels use.
2. A lower bound on the k-th best exact cosine (times |q|): a row's 4 lanes keep the best lower
   bound s_n - E of 8 disjoint groups of keys each (32 groups per row); the k-th largest of the 32
   is reached by k distinct keys (one bitonic sort across the warp per row).
3. Candidates: the products again, keys whose upper bound s_n + E reaches the row's cut (and any
   non-finite s_n) gathered into the row's list in shared memory (ballots per row's 4 lanes).
4. Per row, as ``prefill_top_k``: the candidates' exact float32 cosines (the decode scan's
   products in its order, read from the bank's [KVH, d, N] keys), one bitonic sort of (cosine, key)
   pairs for up to 32 candidates, the lanes' sorted lists beyond; a row whose list overflowed
   (near-identical keys) ranks every key exactly.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from services.generator import kernel_parts
from services.generator.prefill_top_k import APPROX_E

_THREADS = 128  # four warps of 16 query rows per block
CAPACITY = 64  # candidates listed per query row before the row ranks every key
DTYPES = (mx.float16, mx.bfloat16)

# inputs: q [B, H, L, D] (any strides), keys_t [KVH, D, N] (contiguous, the bank's), inv_norms
# [KVH, N] float32, threshold [1] float32, topk [1] int32, bound [1] float32 (E). outputs: rows
# [B, H, L, k] int32 (-1 where the cosine is not above the threshold), dots [B, H, L, k] float32.
_SOURCE = """
  const int B = q_shape[0];
  const int H = q_shape[1];
  const int L = q_shape[2];
  const int KVH = keys_t_shape[0];
  const int N = keys_t_shape[2];
  const int rep = H / KVH;
  const int k = topk[0];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int tiles = (L + 15) / 16;
  const int wid = blockIdx.x * (T / 32) + warp;
  if (wid >= B * H * tiles) return;  // whole warps only: no block barrier below
  const int b = wid / (H * tiles);
  const int h = (wid / tiles) % H;
  const int l0 = (wid % tiles) * 16;
  const int g = h / rep;
  const int gid = lane >> 2, tig = lane & 3;
  const Tk* kt = keys_t + (size_t)g * D * N;
  const float* ng = inv_norms + (size_t)g * N;

  // The warp's 16 query rows as the product's A tiles (rows past L: zeros); |q| of this lane's two
  // rows (l0 + gid, l0 + gid + 8) for their bounds.
  const Tk* qb = q + (size_t)b * q_strides[0] + (size_t)h * q_strides[1];
  unsigned a[D / 16][4];
  float qq[2] = {0.f, 0.f};
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int lq = l0 + gid + (r & 1) * 8;
      const Tk* qe = qb + (size_t)lq * q_strides[2] + (size_t)(ks * 16 + tig * 2 + (r >> 1) * 8) * q_strides[3];
      const Tk x0 = lq < L ? qe[0] : Tk(0.f), x1 = lq < L ? qe[q_strides[3]] : Tk(0.f);
      a[ks][r] = em_pack2(x0, x1);
      qq[r & 1] += static_cast<float>(x0) * static_cast<float>(x0) + static_cast<float>(x1) * static_cast<float>(x1);
    }
  }
  float E[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    qq[i] += __shfl_xor_sync(0xffffffff, qq[i], 1);
    qq[i] += __shfl_xor_sync(0xffffffff, qq[i], 2);
    E[i] = bound[0] * sqrtf(qq[i]) * 1.0001f;  // |q| summed in another order than step 4's: margin
  }

  // One tile: c[j] = s of row l0 + gid + 8 (j >> 1), key n0 + 2 tig + (j & 1) (-inf past N).
  auto scores = [&](int n0, float* c) {
    c[0] = c[1] = c[2] = c[3] = 0.f;
    const int n = n0 + gid;  // this lane's key in the B tile
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      unsigned kf[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const Tk* ke = kt + (size_t)(ks * 16 + tig * 2 + r * 8) * N + n;
        kf[r] = n < N ? em_pack2(ke[0], ke[N]) : 0u;
      }
      em_mma_16816<BF>(c, a[ks], kf);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int nj = n0 + tig * 2 + (j & 1);
      c[j] = nj < N ? c[j] * ng[nj] : EM_NEG_INF;
    }
  };

  // 2. Each row's 32 group bounds (this lane: groups (n0 / 8) % 4 and j & 1 of its columns).
  float lo[2][8];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int u = 0; u < 8; ++u) lo[i][u] = EM_NEG_INF;
  for (int n0 = 0; n0 < N; n0 += 32) {
#pragma unroll
    for (int t = 0; t < 4; ++t) {
      float c[4];
      scores(n0 + 8 * t, c);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float low = c[j] - E[j >> 1];
        if (low > lo[j >> 1][2 * t + (j & 1)]) lo[j >> 1][2 * t + (j & 1)] = low;  // NaN never wins
      }
    }
  }
  __shared__ float bound_all[(T / 32) * 16 * 32];
  __shared__ float cut_all[(T / 32) * 16];
  float* bound_w = bound_all + warp * 16 * 32;
  float* cut_w = cut_all + warp * 16;
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int u = 0; u < 8; ++u) bound_w[(gid + 8 * i) * 32 + tig * 8 + u] = lo[i][u];
  __syncwarp();
  for (int i = 0; i < 16; ++i) {
    float v = bound_w[i * 32 + lane];
    if (!(v > EM_NEG_INF && v < -EM_NEG_INF)) v = EM_NEG_INF;  // +inf bounds nothing
    const float cut = __shfl_sync(0xffffffff, em_warp_sort_desc(v), k - 1);
    if (lane == 0) cut_w[i] = cut;
  }
  __syncwarp();

  // 3. Candidates into each row's list (counts the same in the row's 4 lanes).
  __shared__ int list_all[(T / 32) * 16 * CAP];
  int* list_w = list_all + warp * 16 * CAP;
  const float cut2[2] = {cut_w[gid], cut_w[gid + 8]};
  int count[2] = {0, 0};
  for (int n0 = 0; n0 < N; n0 += 8) {
    float c[4];
    scores(n0, c);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int i = j >> 1;
      const bool hit = l0 + gid + 8 * i < L && n0 + tig * 2 + (j & 1) < N &&
                       !(c[j] + E[i] < cut2[i] && c[j] > EM_NEG_INF);
      const unsigned quad = (__ballot_sync(0xffffffff, hit) >> (gid * 4)) & 0xfu;
      const int at = count[i] + __popc(quad & ((1u << tig) - 1u));
      if (hit && at < CAP) list_w[(gid + 8 * i) * CAP + at] = n0 + tig * 2 + (j & 1);
      count[i] += __popc(quad);
    }
  }
  __shared__ int count_all[(T / 32) * 16];
  int* count_w = count_all + warp * 16;
  if (tig == 0) {
    count_w[gid] = count[0];
    count_w[gid + 8] = count[1];
  }
  __shared__ float qs_all[(T / 32) * D];
  float* qs = qs_all + warp * D;
  __syncwarp();

  // 4. Each row: exact cosines of its candidates, the top-k.
  for (int i = 0; i < 16 && l0 + i < L; ++i) {  // the same bound in every lane
    const int l = l0 + i;
    const int row = (b * H + h) * L + l;
    float part = 0.f;
    for (int e = lane; e < D; e += 32) {
      const float x = static_cast<float>(qb[(size_t)l * q_strides[2] + (size_t)e * q_strides[3]]);
      qs[e] = x;
      part += x * x;
    }
    for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffff, part, o);
    const float q_inv = rsqrtf(fmaxf(part, 1e-24f));
    __syncwarp();
    const int total = count_w[i];
    const int* found = list_w + i * CAP;
    float best_s[1];
    int best_i[1];
    if (total <= 32) {
      int n = lane < total ? found[lane] : -1;
      float c = n >= 0 ? em_dot_col<D, Tk>(qs, kt + n, N) * q_inv * ng[n] : EM_NEG_INF;
      if (!(c > EM_NEG_INF)) { c = EM_NEG_INF; n = -1; }  // a NaN cosine is never picked (as em_insert)
      em_warp_sort_pairs_desc(c, n);
      best_s[0] = c;
      best_i[0] = n;
    } else {
      float s[1][K];  // one list: em_warp_top_k takes sets of lists
      int ix[1][K];
#pragma unroll
      for (int j = 0; j < K; ++j) { s[0][j] = EM_NEG_INF; ix[0][j] = -1; }
      // An overflowed list ranks every key; else the listed ones.
      const int m = total <= CAP ? total : N;
      for (int j = lane; j < m; j += 32) {
        const int n = total <= CAP ? found[j] : j;
        em_insert<K>(s[0], ix[0], em_dot_col<D, Tk>(qs, kt + n, N) * q_inv * ng[n], n);
      }
      em_warp_top_k<1, K>(s, ix, k, best_s, best_i);
    }
    if (lane < k) {
      const int n = best_i[0];
      rows[(size_t)row * k + lane] = n >= 0 && best_s[0] > threshold[0] ? n : -1;
      dots[(size_t)row * k + lane] = n >= 0 ? em_dot_col<D, Tk>(qs, kt + n, N) : 0.f;
    }
    __syncwarp();  // qs is the next row's
  }
"""


@functools.cache
def _kernel():
    return mx.fast.cuda_kernel(
        name="extmind_prefill_top_k_mma",
        input_names=["q", "keys_t", "inv_norms", "threshold", "topk", "bound"],
        output_names=["rows", "dots"],
        source=_SOURCE,
        header=kernel_parts.HEADER + kernel_parts.TOPK_HEADER + kernel_parts.MMA_HEADER,
        ensure_row_contiguous=False,
    )


def takes(q: mx.array, keys_t: mx.array) -> bool:
    """Whether this kernel serves ``prefill_top_k.top_k_rows`` for these queries and keys:
    16-bit queries of the bank's dtype and a head size that is a multiple of 16."""
    return q.dtype in DTYPES and keys_t.dtype == q.dtype and q.shape[-1] % 16 == 0


def top_k_rows(q: mx.array, keys_t: mx.array, inv_norms: mx.array, k: int, list_size: int, threshold: mx.array):
    """``prefill_top_k.top_k_rows`` for queries ``takes`` accepts: q [B, H, L, d] (any strides);
    keys_t [KVH, d, N] and inv_norms [KVH, N] float32 contiguous, as bank_cache holds them; k <= N
    and <= list_size; threshold [1] float32 -> (rows [B, H, L, k] int32, -1 where the cosine is not
    above the threshold; dots [B, H, L, k] float32, raw q . k), rows in descending exact cosine,
    ties at the k-th place either way."""
    B, H, L, d = q.shape
    warps = B * H * -(-L // 16)
    per_block = _THREADS // 32
    rows, dots = _kernel()(
        inputs=[
            q,
            keys_t,
            inv_norms,
            threshold,
            kernel_parts.scalar(k, mx.int32),
            kernel_parts.scalar(APPROX_E, mx.float32),
        ],
        template=[
            ("Tk", keys_t.dtype),
            ("D", d),
            ("K", list_size),
            ("T", _THREADS),
            ("CAP", CAPACITY),
            ("BF", int(keys_t.dtype == mx.bfloat16)),
        ],
        grid=(-(-warps // per_block) * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(B, H, L, k), (B, H, L, k)],
        output_dtypes=[mx.int32, mx.float32],
    )
    return rows, dots
