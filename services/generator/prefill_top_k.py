"""The exact cosine top-k of a long batch of queries (a prefill) over one layer's bank, on CUDA.

A prefill of L tokens asks for the top-k of B * H * L query rows, each over the bank's N rows.
The decode scan (``fused_attention.top_k_rows``) would read the whole bank once per query row; one
matmul reads it once. Then each query row's N scores are ranked here, one warp per row
(docs/architecture.md, "Prefill with memories"):

1. Approximate scores from a matmul against unit keys: a_n = q . (k_n * inv_norm_n) is within
   ``E * |q|`` of |q| c_n, c_n the exact float32 cosine (``E`` when the queries are made unit
   first, below). For a float16 bank the matmul is float16 on the tensor cores (float32
   accumulation in cuBLAS, float16 result): the roundings of the unit key and of the result cost
   at most 2^-11 of |q| each, plus float32 accumulation and subnormal components (relative to |q|,
   far below the margin) and, for the result, an absolute 2^-25 where it is subnormal (the kernel
   adds 2^-24). The queries go in as they are when the matmul's dtype holds them exactly (float16
   queries and bank; any query for the float32 matmul, though TF32 rounds a float32 query once
   more, 2^-11 of |q|, within E): no normalizing ops per layer, the kernel scales the bound by
   each row's |q|. Float32 queries with a float16 bank are made unit first
   (a float16 rounding of a raw float32 query could underflow): one more rounding of 2^-11, which
   ``E`` counts either way. For banks other than float16 the matmul is float32, which MLX may run
   in TF32 (its default on CUDA): TF32 inputs rounded to nearest carry float16's 11-bit
   significand, so the same bound holds; truncated, a score may be off by up to 2^-9 of |q|, but
   only towards zero product by product, which cannot skip a top-k row
   (test_prefill_top_k_bound.py): the ranking stays exact either way.
   With the norms folded into the unit keys, the kernel reads nothing but the scores for every
   row. The unit keys (one fused op per layer) and the row-major copy of step 3 are
   ``prefill_keys``, which a cached bank makes at its first prefill and keeps
   (``bank_cache.Bank.prefill_keys``: two launches per layer fewer for every later prompt).
2. A lower bound on the k-th best exact cosine (times |q|): each lane's best lower bound a_n - E
   over its stripe names one row whose cosine is at least that; the k-th largest of the 32
   lanes' bounds (one bitonic sort across the warp) is a cosine that k distinct rows reach.
   The lanes keep their loads of a row's first ``HELD_BYTES`` in shared memory for step 3,
   which then reads nothing else of them from global memory.
3. Candidates: the rows whose upper bound a_n + E reaches it (and any non-finite a_n), so every
   row of the exact top-k is one. Only they get their exact float32 cosine (q . k from the bank's
   keys: the products of the decode scan summed in its order, read from the row-major copy of
   the keys in ``prefill_keys`` (step 1), where a key column would cost D scattered loads). The warp gathers them
   into a shared list (ballots) and scores them 32 at a time, one per lane, so that their keys'
   loads are in flight together. Up to 32 candidates in all: one
   bitonic sort of the lanes' (cosine, row) pairs takes the top-k. More (near-identical rows):
   each group of 32 enters the lanes' sorted lists, and k rounds of a warp-wide argmax take the
   winners (kernel_parts' ``em_warp_top_k``, as the decode scan).

Float16 scores are tested eight at a time in steps 2 and 3 by packed half2 maxima and minima
(``PACK_SCORES``): a load with no candidate costs a few instructions. The same rows and dots; the
kernel 0.97x on the H200, so it waits on memory, not on instructions (bench/RESULTS.md, H200
2026-12-03 09:05).

Stage 2 is what makes it fast: a lane inserting into its list whenever a new row beats its worst
entry (most rows early in a stripe do) kept every lane of the warp waiting on the slowest. The
sorts and the gathering replaced k rounds of shuffles for the bound and a lane-by-lane scoring of
each stripe's candidates: 0.73-0.81x the time at 4 096 rows, 1.05-1.06x at 65 536 (bench/RESULTS.md,
H200 2026-12-02 12:44).
"""

from __future__ import annotations

import functools

import mlx.core as mx

from services.generator import kernel_parts

# The bound of |a_n - c_n| for unit queries (of |a_n - |q| c_n| / |q| for raw ones, which do not
# take the query's rounding): 2^-11 each for the roundings of the unit query, the unit key (float16
# or TF32) and the float16 result, float32 accumulation in the matmul and in the exact dot over
# <= 256 products (~2 * 1.5e-5), the two inverse norms (~1e-6) and subnormal float16 components
# (absolute 2^-25 each: < 2^-20 over 256 of them), with margin.
APPROX_E = 2.0**-10 + 2.0**-11 + 2.0**-13
_THREADS = 128  # four query rows (warps) per block
# A row's scores held in shared memory between the bound and the candidates (the kernel's HOLD):
# its first 8 KiB a warp (4 096 float16 scores, 2 048 float32), 32 KiB a block of four warps.
HELD_BYTES = 8192
HOLD_SCORES = True  # off: both steps read the scores from global memory (bench A/B)
# float16 scores in 16-byte loads (the kernel's PACK): step 2 takes each load's largest score, and
# step 3 passes over loads with no candidate, by packed half2 maxima and minima (a few ops per 8
# scores for ~5 per score). Off: every score converted and tested alone (bench A/B).
PACK_SCORES = True

# inputs: q [B, H, L, D] (contiguous), approx [KVH, M, N] (M = B * rep * L in (b, r, l) order:
# approximate cosines, or with RAW approximate q . unit key, float16 or float32), keys [KVH, N, D]
# (row-major, contiguous), inv_norms [KVH, N] float32, threshold [1] float32, topk [1] int32, bound [1] float32 (E).
# outputs: rows [B, H, L, k] int32 (-1 where the cosine is not above the threshold), dots
# [B, H, L, k] float32 (raw q . k).
_SOURCE = """
  const int B = q_shape[0];
  const int H = q_shape[1];
  const int L = q_shape[2];
  const int KVH = approx_shape[0];
  const int M = approx_shape[1];
  const int N = approx_shape[2];
  const int rep = H / KVH;
  const int k = topk[0];
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int row = blockIdx.x * (T / 32) + warp;
  if (row >= B * H * L) return;  // whole warps only: no block barrier below
  const int b = row / (H * L);
  const int h = (row / L) % H;
  const int l = row % L;
  const int g = h / rep;
  const int m = (b * rep + h % rep) * L + l;

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
  // Raw queries' scores are |q| times a cosine: so is their bound, plus a float16 result's
  // absolute rounding where it is subnormal (module docstring).
  const float E = RAW ? bound[0] / q_inv + 5.9604645e-8f : bound[0];
  __syncwarp();

  const Ta* ar = approx + ((size_t)g * M + m) * N;
  const float* ng = inv_norms + (size_t)g * N;
  const Tk* kg = keys + (size_t)g * N * D;
  // Row n's exact float32 cosine: the decode scan's products in its order, times both inverse norms.
  auto cosine = [&](int n) { return em_dot_r<D, Tk>(qs, kg + (size_t)n * D) * q_inv * ng[n]; };

  // Rows are read 16 bytes per lane at a time (V of them), up to 8 loads in flight: one row at
  // a time per lane kept too few bytes in flight to use the memory bandwidth. A bank whose row
  // count is not a multiple of V takes the row-at-a-time loops.
  constexpr int V = 16 / sizeof(Ta);
  const bool vec = N % V == 0;
  // HOLD (vec): step 2 keeps each lane's 16-byte loads of the row's first HELD_RUNS runs in
  // shared memory (lane-major per run: conflict-free) and step 3 reads them there, so those are
  // read from global memory once; a longer row's other runs are read twice.
  __shared__ uint4 held_all[HOLD ? (T / 32) * HELD_RUNS * 32 : 1];
  uint4* held = held_all + (HOLD ? warp * HELD_RUNS * 32 : 0);

  // 2. Each lane's best lower bound, then the k-th largest over the lanes.
  float lo = EM_NEG_INF;
  if (vec) {
    // PACK (float16 scores): each load's largest score by packed maxima (NaN passed over, as
    // below), minus E once at the end: a - E rounds monotonically in a, so lo is the same.
    __half2 top2 = __half2half2(__float2half(EM_NEG_INF));
#pragma unroll 8
    for (int base = lane * V, run = 0; base < N; base += 32 * V, ++run) {
      const uint4 raw = *reinterpret_cast<const uint4*>(ar + base);
      if (HOLD && run < HELD_RUNS) held[run * 32 + lane] = raw;
      if (PACK) {
        const __half2* hv = reinterpret_cast<const __half2*>(&raw);
        top2 = __hmax2(top2, __hmax2(__hmax2(hv[0], hv[1]), __hmax2(hv[2], hv[3])));
      } else {
        const Ta* av = reinterpret_cast<const Ta*>(&raw);
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float low = static_cast<float>(av[j]) - E;
          if (low > lo) lo = low;  // NaN never wins; +-inf are not bounds of anything
        }
      }
    }
    if (PACK) lo = fmaxf(__low2float(top2), __high2float(top2)) - E;  // top2 holds no NaN
  } else {
#pragma unroll 4
    for (int n = lane; n < N; n += 32) {
      const float low = static_cast<float>(ar[n]) - E;
      if (low > lo) lo = low;
    }
  }
  if (!(lo > EM_NEG_INF && lo < -EM_NEG_INF)) lo = EM_NEG_INF;
  // The lanes' bounds sorted across the warp (one bitonic network, not k rounds of an argmax).
  const float cut = __shfl_sync(0xffffffff, em_warp_sort_desc(lo), k - 1);

  // 3. Candidates: gathered in the warp's order into a shared list (ballots, only for runs where
  // a lane has one), then scored 32 at a time, one per lane, so that their keys' loads are in
  // flight together (a lane scoring its own stripe's candidates one by one waited on each key's
  // load in turn, while the other lanes waited on it). At most 32 in all: one
  // bitonic sort of the lanes' (cosine, row) takes the top-k. More: each group of 32 enters the
  // lanes' sorted lists, and k rounds of a warp-wide argmax take the winners.
  float s[1][K];  // one list: em_warp_top_k takes sets of lists
  int ix[1][K];
#pragma unroll
  for (int j = 0; j < K; ++j) { s[0][j] = EM_NEG_INF; ix[0][j] = -1; }
  __shared__ int found_all[(T / 32) * 32 * (V + 1)];  // < 32 left over + 32 * V new per run
  int* found = found_all + warp * 32 * (V + 1);
  int count = 0;  // the same in every lane
  bool listed = false;
  // PACK: a load none of whose 8 scores can be a candidate is passed over in a few packed ops:
  // every score below t2 (cut - 2E rounded down to float16: a < t2 gives a + E < cut, the
  // float32 roundings far inside the other E) and none -inf (a NaN fails the comparison). Loads
  // that fail the test take the exact per-score rule.
  const __half2 t2 = __half2half2(__float2half_rd(cut - 2.f * E));
  const __half2 neg2 = __half2half2(__float2half(EM_NEG_INF));
  for (int base0 = 0; base0 < N; base0 += 32 * V) {
    // This lane's V rows of the run: adjacent (one 16-byte load) or strided by 32.
    unsigned cand = 0;
    if (vec) {
      if (base0 + lane * V < N) {  // N % V == 0
        const int run = base0 / (32 * V);
        const uint4 raw = HOLD && run < HELD_RUNS ? held[run * 32 + lane]
                                                  : *reinterpret_cast<const uint4*>(ar + base0 + lane * V);
        bool quiet = false;
        if (PACK) {
          const __half2* hv = reinterpret_cast<const __half2*>(&raw);
          const __half2 hi = __hmax2_nan(__hmax2_nan(hv[0], hv[1]), __hmax2_nan(hv[2], hv[3]));
          const __half2 low = __hmin2(__hmin2(hv[0], hv[1]), __hmin2(hv[2], hv[3]));
          quiet = __hblt2(hi, t2) && __hbgt2(low, neg2);
        }
        if (!quiet) {
          const Ta* av = reinterpret_cast<const Ta*>(&raw);
#pragma unroll
          for (int j = 0; j < V; ++j) {
            const float a = static_cast<float>(av[j]);
            if (!(a + E < cut && a > EM_NEG_INF)) cand |= 1u << j;
          }
        }
      }
    } else {
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const int n = base0 + j * 32 + lane;
        const float a = n < N ? static_cast<float>(ar[n]) : 0.f;
        if (n < N && !(a + E < cut && a > EM_NEG_INF)) cand |= 1u << j;
      }
    }
    if (__ballot_sync(0xffffffff, cand != 0u) == 0u) continue;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const bool hit = (cand >> j) & 1u;
      const unsigned votes = __ballot_sync(0xffffffff, hit);
      if (hit) found[count + __popc(votes & ((1u << lane) - 1u))] = vec ? base0 + lane * V + j : base0 + j * 32 + lane;
      count += __popc(votes);
    }
    if (count < 32) continue;
    __syncwarp();
    int done = 0;
    for (; count - done >= 32; done += 32) {
      const int n = found[done + lane];
      em_insert<K>(s[0], ix[0], cosine(n), n);
    }
    listed = true;
    const int left = count - done;  // < 32: moved to the front
    const int keep = lane < left ? found[done + lane] : 0;
    __syncwarp();
    if (lane < left) found[lane] = keep;
    count = left;
    __syncwarp();
  }
  __syncwarp();
  float best_s[1];
  int best_i[1];
  if (listed) {
    if (lane < count) {
      const int n = found[lane];
      em_insert<K>(s[0], ix[0], cosine(n), n);
    }
    em_warp_top_k<1, K>(s, ix, k, best_s, best_i);
  } else {
    int n = lane < count ? found[lane] : -1;
    float c = n >= 0 ? cosine(n) : EM_NEG_INF;
    if (!(c > EM_NEG_INF)) { c = EM_NEG_INF; n = -1; }  // a NaN cosine is never picked (as em_insert)
    em_warp_sort_pairs_desc(c, n);
    best_s[0] = c;
    best_i[0] = n;
  }
  if (lane < k) {
    const int n = best_i[0];
    rows[(size_t)row * k + lane] = n >= 0 && best_s[0] > threshold[0] ? n : -1;
    dots[(size_t)row * k + lane] = n >= 0 ? em_dot_r<D, Tk>(qs, kg + (size_t)n * D) : 0.f;
  }
"""


@functools.cache
def _kernel():
    return mx.fast.cuda_kernel(
        name="extmind_prefill_top_k",
        input_names=["q", "approx", "keys", "inv_norms", "threshold", "topk", "bound"],
        output_names=["rows", "dots"],
        source=_SOURCE,
        header=kernel_parts.HEADER + kernel_parts.TOPK_HEADER,
    )


@functools.cache
def _unit_keys(dtype):
    """keys_t [KVH, d, N], inv_norms [KVH, N] float32 -> the unit keys [KVH, d, N] in ``dtype``:
    one fused op (compiled) rather than a cast, a product and a cast."""
    return mx.compile(lambda keys_t, inv_norms: (keys_t.astype(mx.float32) * inv_norms[:, None, :]).astype(dtype))


def _matmul_dtype(keys_dtype) -> mx.Dtype:
    """The scores' matmul dtype for a bank of ``keys_dtype`` (module docstring, step 1)."""
    return mx.float16 if keys_dtype == mx.float16 else mx.float32


def prefill_keys(keys_t: mx.array, inv_norms: mx.array) -> tuple[mx.array, mx.array]:
    """What ``top_k_rows`` reads of one layer's bank besides ``keys_t`` and ``inv_norms``, made
    from them (lazily, two launches): (the unit keys [KVH, d, N] in the scores' matmul dtype,
    float16 for a float16 bank else float32; the keys row-major [KVH, N, d] in their dtype, for
    the candidates' exact dots). ``bank_cache.Bank`` keeps them from a bank's first prefill on."""
    return _unit_keys(_matmul_dtype(keys_t.dtype))(keys_t, inv_norms), mx.contiguous(keys_t.swapaxes(1, 2))


def _holds(approx: mx.array) -> bool:
    """Whether the kernel keeps a row's scores in shared memory (``HOLD``): vector loads (N a
    multiple of 16 bytes' scores); the first ``HELD_BYTES`` of a longer row."""
    n, size = approx.shape[-1], approx.dtype.size
    return HOLD_SCORES and (n * size) % 16 == 0


def _packs(approx: mx.array) -> bool:
    """Whether the kernel screens its float16 scores by packed half2 maxima (``PACK``): 16-byte
    loads of float16 scores (N a multiple of 8)."""
    return PACK_SCORES and approx.dtype == mx.float16 and approx.shape[-1] % 8 == 0


def top_k_rows(
    q: mx.array,
    keys_t: mx.array,
    inv_norms: mx.array,
    k: int,
    list_size: int,
    threshold: mx.array,
    prepared: tuple[mx.array, mx.array] | None = None,
):
    """``fused_attention.top_k_rows`` for a long batch of query rows (B * H * L >= its
    MATMUL_ROWS): the same contract (q [B, H, L, d] contiguous; keys_t [KVH, d, N]; inv_norms
    [KVH, N] float32; k <= N and <= list_size, the compiled list size; threshold [1] float32;
    ``prepared``: ``prefill_keys`` of this bank, made here when None) -> (rows [B, H, L, k] int32,
    -1 where the cosine is not above the threshold; dots [B, H, L, k] float32, raw q . k), rows
    in descending exact cosine, ties at the k-th place either way."""
    B, H, L, d = q.shape
    kvh = keys_t.shape[0]
    rep = H // kvh
    to_rows = (kvh, -1, d)  # [KVH, B * rep * L, d]: a KV head's query rows for one matmul
    # Unit keys, and the queries as they are (scores: |q| times approximate cosines) or made unit
    # (module docstring, step 1). A float16 bank takes a float16 matmul (tensor cores, float16
    # scores); others a float32 one (bfloat16 keys are exact in float32), which MLX may run in
    # TF32: the ranking stays exact.
    dtype = _matmul_dtype(keys_t.dtype)
    raw = q.dtype == dtype or dtype == mx.float32  # held exactly in the matmul's dtype (TF32: within E)
    if raw:
        qm = q.astype(dtype)
    else:
        qf = q.astype(mx.float32)
        qm = (qf * mx.rsqrt(mx.maximum(mx.sum(qf * qf, axis=-1, keepdims=True), 1e-24))).astype(dtype)
    qm = qm.reshape(B, kvh, rep, L, d).transpose(1, 0, 2, 3, 4).reshape(to_rows)  # no copy for B = 1
    unit, keys = prepared if prepared is not None else prefill_keys(keys_t, inv_norms)
    approx = qm @ unit
    rows = B * H * L
    per_block = _THREADS // 32
    out = _kernel()(
        inputs=[
            q,
            approx,
            keys,
            inv_norms,
            threshold,
            kernel_parts.scalar(k, mx.int32),
            kernel_parts.scalar(APPROX_E, mx.float32),
        ],
        template=[
            ("Ta", approx.dtype),
            ("Tk", keys.dtype),
            ("D", d),
            ("K", list_size),
            ("T", _THREADS),
            ("RAW", int(raw)),
            ("HOLD", int(_holds(approx))),
            ("HELD_RUNS", max(1, HELD_BYTES // (32 * 16))),  # one size: one compiled kernel whatever N
            ("PACK", int(_packs(approx))),
        ],
        grid=(-(-rows // per_block) * _THREADS, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[(B, H, L, k), (B, H, L, k)],
        output_dtypes=[mx.int32, mx.float32],
    )
    return out[0], out[1]
