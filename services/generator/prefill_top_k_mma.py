"""The exact cosine top-k of a prefill's query rows with the scores on tensor cores, never in memory
(docs/architecture.md, "Prefill with memories"), on GPUs of compute capability 8.0 and later.

``prefill_top_k`` writes every query row's N approximate scores (one matmul: 128 MiB per layer for
the 1 B shape's 512-token prompt over 4 096 rows) and reads them twice. Here two kernels do the
same ranking with the scores made in registers and dropped there:

1. ``CANDIDATES``: a block takes 128 query rows of one KV head (16 x MT rows per warp) and runs
   over the bank's unit keys (float16, row-major) in tiles through shared memory, each tile's
   scores by ``mma.sync.m16n8k16`` (float32 accumulation). Pass 1 keeps, for each query row, the
   best score of each of 32 disjoint stripes of the bank (a stripe: one column position of each
   tile's columns held by one lane); the k-th largest of those maxima less E is the same lower
   bound on the k-th best exact cosine as ``prefill_top_k``'s step 2 (k distinct rows reach it).
   Pass 2 makes the scores again and lists each row's candidates, the rows whose score plus E
   reaches that bound (``prefill_top_k``'s step 3), in order of tile, lane and column: up to C per
   query row in global memory, with their count.
2. ``RERANK``: one warp per query row scores its candidates exactly (the decode scan's float32
   products in its order, ``kernel_parts.em_dot_r``) and takes the top-k as ``prefill_top_k``
   does: one sort across the warp for up to 32 candidates, sorted lists and a warp-wide argmax
   for more. A row with more than C candidates (a bank of near-identical rows, or a zero query
   whose every score ties) takes the exact cosine of every row instead: slower, still exact.

The scores: q . u_n, u_n the unit key rounded to float16 (made once per cached bank). A float16
query goes in as it is (the score is |q| times an approximate cosine; the bound is scaled by |q|);
others are made unit in float32 and rounded to float16 first, one more rounding of 2^-11. Either
way ``prefill_top_k.APPROX_E`` bounds the error (its docstring; the float32 accumulation here
drops the float16 result's rounding), so the ranking is exact as there.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from services.generator import kernel_parts

THREADS = 128  # four warps per block
MT = 2  # 16-row tiles of queries per warp: 128 query rows per block share each tile of keys
CAPACITY = 64  # candidates listed per query row; more take the exact scan of the whole bank
MAX_HEAD_DIM = 128  # the query fragments stay in registers (D / 4 per tile of rows)


def keys_per_tile(d: int) -> int:
    """Keys per shared-memory tile: 8 KiB of float16 keys (64 of d = 64, 32 of d = 128)."""
    return 64 if d <= 64 else 32


# The tile loop's pieces, force-inlined so that the register arrays they take stay in registers.
TILE_HEADER = r"""
// Tile it of the unit keys ug [N, D] (NT keys): this thread's 16-byte chunks (zeros past N).
template <int D, int NT, int T, int U>
__device__ __forceinline__ void em_fetch_keys(uint4 (&pre)[U], const __half* ug, int it, int N) {
  constexpr int CH = D / 8;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int idx = threadIdx.x + u * T;
    const int n = it * NT + idx / CH;
    pre[u] = idx < NT * CH && n < N ? *reinterpret_cast<const uint4*>(ug + (size_t)n * D + (idx % CH) * 8)
                                    : uint4{0u, 0u, 0u, 0u};
  }
}

// The chunks into a shared buffer of NT keys, D + 8 halves apart (B fragments conflict-free).
template <int D, int NT, int T, int U>
__device__ __forceinline__ void em_put_keys(const uint4 (&pre)[U], __half* buf) {
  constexpr int CH = D / 8;
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int idx = threadIdx.x + u * T;
    if (idx < NT * CH) *reinterpret_cast<uint4*>(buf + (idx / CH) * (D + 8) + (idx % CH) * 8) = pre[u];
  }
}

// A tile's scores: c[mt][t][j] = the warp's row (mt, j / 2) against the tile's key 8 t + 2 tig + j % 2.
// By k-step, every column group's product in turn: the 8 x MT products of a step are independent (a
// step's product waits on the same accumulator's previous step only), and the next step's B
// fragments are loaded before this step's products, so neither the loads' nor the products'
// latencies hold the tensor cores up.
template <int D, int NT, int MT>
__device__ __forceinline__ void em_tile_scores(
    const __half* kt, const unsigned (&a)[MT][D / 16][4], float (&c)[MT][NT / 8][4]) {
  const int lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;
#pragma unroll
  for (int t = 0; t < NT / 8; ++t) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int j = 0; j < 4; ++j) c[mt][t][j] = 0.f;
    }
  }
  const __half* kp = kt + gid * (D + 8) + tig * 2;
  unsigned bf[2][NT / 8][2];
#pragma unroll
  for (int t = 0; t < NT / 8; ++t) {
    bf[0][t][0] = *reinterpret_cast<const unsigned*>(kp + t * 8 * (D + 8));
    bf[0][t][1] = *reinterpret_cast<const unsigned*>(kp + t * 8 * (D + 8) + 8);
  }
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    if (ks + 1 < D / 16) {
#pragma unroll
      for (int t = 0; t < NT / 8; ++t) {
        const __half* p = kp + t * 8 * (D + 8) + (ks + 1) * 16;
        bf[(ks + 1) & 1][t][0] = *reinterpret_cast<const unsigned*>(p);
        bf[(ks + 1) & 1][t][1] = *reinterpret_cast<const unsigned*>(p + 8);
      }
    }
#pragma unroll
    for (int t = 0; t < NT / 8; ++t) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) em_mma_16816<0>(c[mt][t], a[mt][ks], bf[ks & 1][t]);
    }
  }
}
"""

# inputs: q [B, H, L, D] (contiguous, Tq), unit [KVH, N, D] float16 (row-major unit keys,
# contiguous), topk [1] int32, bound [1] float32 (E). outputs: cand [B * H * L, C] int32 (the
# first min(count, C) written), counts [B * H * L] int32. Template: D (a multiple of 16), K (the
# compiled list size), MT, NT (keys per tile, a multiple of 8), C, T, RAW (q float16: scores
# |q| times a cosine).
CANDIDATES = """
  const int B = q_shape[0];
  const int H = q_shape[1];
  const int L = q_shape[2];
  const int KVH = unit_shape[0];
  const int N = unit_shape[1];
  const int rep = H / KVH;
  const int M = rep * L;  // a (b, g)'s query rows, (r, l) order
  constexpr int W = T / 32;
  constexpr int RB = W * MT * 16;  // query rows per block
  const int per = (M + RB - 1) / RB;
  const int b = blockIdx.x / (KVH * per);  // the grid has exactly B * KVH * per blocks
  const int g = (blockIdx.x / per) % KVH;
  const int m0 = (blockIdx.x % per) * RB;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int gid = lane >> 2, tig = lane & 3;
  const int k = topk[0];

  // This lane's query rows: (mt, i) -> block row (warp * MT + mt) * 16 + gid + 8 i.
  int grow[MT][2];  // [B, H, L] row index, -1 past M
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int m = m0 + (warp * MT + mt) * 16 + gid + 8 * i;
      grow[mt][i] = m < M ? (b * H + g * rep + m / L) * L + m % L : -1;
    }
  }
  // |q|^2 of each row (the quad's four lanes hold its columns), then the rows as the product's
  // A fragments: as they are (RAW), else made unit and rounded to float16.
  float qq[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      float s = 0.f;
      if (grow[mt][i] >= 0) {
        const Tq* qr = q + (size_t)grow[mt][i] * D;
#pragma unroll
        for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float x = static_cast<float>(qr[ks * 16 + tig * 2 + (e >> 1) * 8 + (e & 1)]);
            s += x * x;
          }
        }
      }
      s += __shfl_xor_sync(0xffffffff, s, 1);
      s += __shfl_xor_sync(0xffffffff, s, 2);
      qq[mt][i] = s;
    }
  }
  unsigned a[MT][D / 16][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int i = r & 1;
      const float scale = RAW ? 1.f : rsqrtf(fmaxf(qq[mt][i], 1e-24f));
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        if (grow[mt][i] < 0) { a[mt][ks][r] = 0u; continue; }
        const Tq* qe = q + (size_t)grow[mt][i] * D + ks * 16 + tig * 2 + (r >> 1) * 8;
        if (RAW) {
          a[mt][ks][r] = em_load_pair(qe, 1, true);
        } else {
          a[mt][ks][r] = em_pack2(__half(static_cast<float>(qe[0]) * scale), __half(static_cast<float>(qe[1]) * scale));
        }
      }
    }
  }

  constexpr int SK = D + 8;  // a key's halves in shared memory (em_put_keys)
  constexpr int TILE = NT * SK;
  constexpr int U = (NT * (D / 8) + T - 1) / T;  // 16-byte chunks per thread per tile
  constexpr int RS = 33;  // a row's 32 stripe maxima in shared memory, padded
  constexpr int KEY_BYTES = 2 * TILE * 2;
  constexpr int RED_BYTES = RB * RS * 4;
  __shared__ uint4 smem[((KEY_BYTES > RED_BYTES ? KEY_BYTES : RED_BYTES) + 15) / 16];
  __shared__ float cut2[RB];
  __shared__ float bound_of[RB];
  __half* kbuf = reinterpret_cast<__half*>(smem);
  const __half* ug = unit + (size_t)g * N * D;
  const int tiles = (N + NT - 1) / NT;
  // Tile it's keys go global -> registers (one tile ahead) -> shared buffer it % 2.
  uint4 pre[U];

  // Pass 1: each row's best score per stripe (slot (2 t + j % 2) % 8 of lane tig: 32 disjoint
  // stripes of the bank per row). Scores of keys past N are none; NaN never wins (fmaxf).
  float best[MT][2][8];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int s = 0; s < 8; ++s) best[mt][i][s] = EM_NEG_INF;
    }
  }
  em_fetch_keys<D, NT, T>(pre, ug, 0, N);
  em_put_keys<D, NT, T>(pre, kbuf);
  __syncthreads();
  for (int it = 0; it < tiles; ++it) {
    if (it + 1 < tiles) em_fetch_keys<D, NT, T>(pre, ug, it + 1, N);
    float c[MT][NT / 8][4];
    em_tile_scores<D, NT, MT>(kbuf + (it & 1) * TILE, a, c);
    const int lim = N - it * NT;  // columns below lim are keys
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int t = 0; t < NT / 8; ++t) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const float v = lim >= NT || t * 8 + tig * 2 + (j & 1) < lim ? c[mt][t][j] : EM_NEG_INF;
          float& m = best[mt][j >> 1][(2 * t + (j & 1)) & 7];
          m = fmaxf(m, v);
        }
      }
    }
    if (it + 1 < tiles) em_put_keys<D, NT, T>(pre, kbuf + ((it + 1) & 1) * TILE);
    __syncthreads();
  }

  // The bound: E (times |q| for RAW rows) per row, the stripe maxima to shared memory (over the
  // key buffers: every warp is past its last tile), then lane r of each warp takes its row r's
  // k-th largest maximum (a +-inf maximum is no row's bound: dropped).
  float* red = reinterpret_cast<float*>(smem);
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int rl = (warp * MT + mt) * 16 + gid + 8 * i;
#pragma unroll
      for (int s = 0; s < 8; ++s) {
        const float v = best[mt][i][s];
        red[rl * RS + tig * 8 + s] = v < -EM_NEG_INF ? v : EM_NEG_INF;
      }
      if (tig == 0) bound_of[rl] = RAW ? bound[0] * sqrtf(qq[mt][i]) + 5.9604645e-8f : bound[0];
    }
  }
  __syncwarp();
  for (int rr = lane; rr < MT * 16; rr += 32) {
    const int rl = warp * MT * 16 + rr;
    float s[K];
    int ix[K];
#pragma unroll
    for (int j = 0; j < K; ++j) { s[j] = EM_NEG_INF; ix[j] = 0; }
    for (int j = 0; j < 32; ++j) em_insert<K>(s, ix, red[rl * RS + j], j);
    float kth = EM_NEG_INF;
#pragma unroll
    for (int j = 0; j < K; ++j) if (j == k - 1) kth = s[j];
    // A candidate: score + E >= kth - E, i.e. score >= kth - 2 E (APPROX_E's margin covers the
    // rounding of that difference); none left out where fewer than k stripes hold a bound.
    cut2[rl] = kth > EM_NEG_INF ? (kth - bound_of[rl]) - bound_of[rl] : EM_NEG_INF;
  }
  __syncthreads();  // cut2 written; the key buffers free again
  float thr[MT][2];
  int count[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      thr[mt][i] = cut2[(warp * MT + mt) * 16 + gid + 8 * i];
      count[mt][i] = 0;
    }
  }

  // Pass 2: the scores again; a row's candidates (not below its cut, or NaN) listed in order of
  // tile, lane (tig) and column: a lane's place after the quad's lower lanes' (shuffles).
  em_fetch_keys<D, NT, T>(pre, ug, 0, N);
  em_put_keys<D, NT, T>(pre, kbuf);
  __syncthreads();
  for (int it = 0; it < tiles; ++it) {
    if (it + 1 < tiles) em_fetch_keys<D, NT, T>(pre, ug, it + 1, N);
    float c[MT][NT / 8][4];
    em_tile_scores<D, NT, MT>(kbuf + (it & 1) * TILE, a, c);
    const int lim = N - it * NT;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      unsigned hits = 0u;  // bit 4 t + j
#pragma unroll
      for (int t = 0; t < NT / 8; ++t) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const bool key = lim >= NT || t * 8 + tig * 2 + (j & 1) < lim;
          if (key && !(c[mt][t][j] < thr[mt][j >> 1])) hits |= 1u << (4 * t + j);
        }
      }
      if (__ballot_sync(0xffffffff, hits != 0u) == 0u) continue;
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        unsigned mine = hits & (i ? 0xccccccccu : 0x33333333u);
        const int n_mine = __popc(mine);
        int before = 0, all = 0;
#pragma unroll
        for (int o = 0; o < 4; ++o) {
          const int n_o = __shfl_sync(0xffffffff, n_mine, (lane & ~3) + o);
          before += o < tig ? n_o : 0;
          all += n_o;
        }
        int at = count[mt][i] + before;
        int* list = cand + (size_t)(grow[mt][i] < 0 ? 0 : grow[mt][i]) * C;
        while (mine != 0u) {
          const int bit = __ffs((int)mine) - 1;
          mine &= mine - 1u;
          if (grow[mt][i] >= 0 && at < C) list[at] = it * NT + (bit >> 2) * 8 + tig * 2 + (bit & 1);
          ++at;
        }
        count[mt][i] += all;
      }
    }
    if (it + 1 < tiles) em_put_keys<D, NT, T>(pre, kbuf + ((it + 1) & 1) * TILE);
    __syncthreads();
  }
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      if (tig == 0 && grow[mt][i] >= 0) counts[grow[mt][i]] = count[mt][i];
    }
  }
"""

# inputs: q [B, H, L, D] (contiguous, Tq), keys [KVH, N, D] (row-major, contiguous, Tk), inv_norms
# [KVH, N] float32, cand / counts (CANDIDATES'), threshold [1] float32, topk [1] int32. outputs:
# rows [B, H, L, k] int32 (-1 where the cosine is not above the threshold), dots [B, H, L, k]
# float32 (raw q . k). One warp per query row.
RERANK = """
  const int B = q_shape[0];
  const int H = q_shape[1];
  const int L = q_shape[2];
  const int KVH = keys_shape[0];
  const int N = keys_shape[1];
  const int rep = H / KVH;
  const int k = topk[0];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int row = blockIdx.x * (T / 32) + warp;
  if (row >= B * H * L) return;  // whole warps only: no block barrier below
  const int g = (row / L) % H / rep;

  __shared__ float qs_all[(T / 32) * D];
  float* qs = qs_all + warp * D;
  float part = 0.f;
  for (int e = lane; e < D; e += 32) {
    const float x = static_cast<float>(q[(size_t)row * D + e]);
    qs[e] = x;
    part += x * x;
  }
  for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffff, part, o);
  const float q_inv = rsqrtf(fmaxf(part, 1e-24f));
  __syncwarp();
  const float* ng = inv_norms + (size_t)g * N;
  const Tk* kg = keys + (size_t)g * N * D;
  auto cosine = [&](int n) { return em_dot_r<D, Tk>(qs, kg + (size_t)n * D) * q_inv * ng[n]; };

  const int count = counts[row];
  const int* list = cand + (size_t)row * C;
  float best_s[1];
  int best_i[1];
  if (count <= 32) {  // one sort of the lanes' (cosine, row) pairs
    int n = lane < count ? list[lane] : -1;
    float c = n >= 0 ? cosine(n) : EM_NEG_INF;
    if (!(c > EM_NEG_INF)) { c = EM_NEG_INF; n = -1; }  // a NaN cosine is never picked (as em_insert)
    em_warp_sort_pairs_desc(c, n);
    best_s[0] = c;
    best_i[0] = n;
  } else {  // the lanes' sorted lists, then k rounds of a warp-wide argmax; past C every row
    float s[1][K];
    int ix[1][K];
#pragma unroll
    for (int j = 0; j < K; ++j) { s[0][j] = EM_NEG_INF; ix[0][j] = -1; }
    const bool listed = count <= C;
    const int end = listed ? count : N;
    for (int j = lane; j < end; j += 32) {
      const int n = listed ? list[j] : j;
      em_insert<K>(s[0], ix[0], cosine(n), n);
    }
    em_warp_top_k<1, K>(s, ix, k, best_s, best_i);
  }
  if (lane < k) {
    const int n = best_i[0];
    rows[(size_t)row * k + lane] = n >= 0 && best_s[0] > threshold[0] ? n : -1;
    dots[(size_t)row * k + lane] = n >= 0 ? em_dot_r<D, Tk>(qs, kg + (size_t)n * D) : 0.f;
  }
"""


@functools.cache
def candidates_kernel():
    return mx.fast.cuda_kernel(
        name="extmind_prefill_candidates",
        input_names=["q", "unit", "topk", "bound"],
        output_names=["cand", "counts"],
        source=CANDIDATES,
        header=kernel_parts.HEADER + kernel_parts.TOPK_HEADER + kernel_parts.MMA_HEADER + TILE_HEADER,
    )


@functools.cache
def rerank_kernel():
    return mx.fast.cuda_kernel(
        name="extmind_prefill_rerank",
        input_names=["q", "keys", "inv_norms", "cand", "counts", "threshold", "topk"],
        output_names=["rows", "dots"],
        source=RERANK,
        header=kernel_parts.HEADER + kernel_parts.TOPK_HEADER,
    )


def applies(d: int, tensor_cores: bool) -> bool:
    """Whether a prefill of head size ``d`` takes this path: a multiple of 16 up to MAX_HEAD_DIM,
    on a GPU with 16-bit tensor-core products (``kernel_parts.tensor_cores``)."""
    return tensor_cores and d % 16 == 0 and d <= MAX_HEAD_DIM


def top_k_rows(
    q: mx.array,
    unit: mx.array,
    keys: mx.array,
    inv_norms: mx.array,
    k: int,
    list_size: int,
    threshold: mx.array,
    bound: float,
):
    """``prefill_top_k.top_k_rows`` by the two kernels above: q [B, H, L, d] contiguous (any float
    dtype; d as ``applies`` takes it); unit [KVH, N, d] float16 unit keys and keys [KVH, N, d]
    (the bank's dtype), both row-major (``prefill_top_k.prefill_keys``); inv_norms [KVH, N]
    float32; k <= N and <= list_size; threshold [1] float32; bound the scores' error bound
    (``prefill_top_k.APPROX_E``) -> (rows [B, H, L, k] int32, -1 where the cosine is not above the
    threshold; dots [B, H, L, k] float32, raw q . k), rows in descending exact cosine."""
    B, H, L, d = q.shape
    kvh = unit.shape[0]
    rows = B * H * L
    per_block = (THREADS // 32) * MT * 16
    blocks = B * kvh * -(-(H // kvh * L) // per_block)
    k_arr = kernel_parts.scalar(k, mx.int32)
    cand, counts = candidates_kernel()(
        inputs=[q, unit, k_arr, kernel_parts.scalar(bound, mx.float32)],
        template=[
            ("Tq", q.dtype),
            ("D", d),
            ("K", list_size),
            ("MT", MT),
            ("NT", keys_per_tile(d)),
            ("C", CAPACITY),
            ("T", THREADS),
            ("RAW", int(q.dtype == mx.float16)),
        ],
        grid=(blocks * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(rows, CAPACITY), (rows,)],
        output_dtypes=[mx.int32, mx.int32],
    )
    out = rerank_kernel()(
        inputs=[q, keys, inv_norms, cand, counts, threshold, k_arr],
        template=[("Tk", keys.dtype), ("D", d), ("K", list_size), ("C", CAPACITY), ("T", THREADS)],
        grid=(-(-rows // (THREADS // 32)) * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(B, H, L, k), (B, H, L, k)],
        output_dtypes=[mx.int32, mx.float32],
    )
    return out[0], out[1]
