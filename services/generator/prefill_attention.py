"""Extended attention of a long batch of queries (a prefill): the local part by MLX's own fused
attention, merged with the memories by log-sum-exp (docs/architecture.md, "Prefill with
memories").

One softmax over [memory logits | local logits] splits exactly into two: with m the memory logits,
l the local ones, lse = log sum_j exp(l_j) and o_local = softmax(l) @ V (what
``mx.fast.scaled_dot_product_attention`` returns),

    out = (exp(lse - M) * o_local + sum_i exp(m_i - M) * v_i) / (exp(lse - M) + sum_i exp(m_i - M))

for any M (the larger of lse and max m, so nothing overflows). The fused attend kernel
(``fused_attention.attend``) computes the local part itself, one thread block per query row over
every local position: right for a decode step (one query per sequence), slow for a prefill, where
MLX's flash attention does the same work several times faster. Here only the local logits are
computed a second time, for their log-sum-exp (the fused attention does not return it): on CUDA,
for queries and keys of one 16-bit dtype (head size a multiple of 16; compute capability >= 8.0),
by the merge kernel itself (tensor-core products, 16 query rows per warp: _MERGE_MMA), else by one
float32 matmul whose logits a merge kernel reads (one warp per query row: _MERGE_LOGITS); either kernel then takes their
log-sum-exp and merges the memories (k per query head and token). Without the kernels (off CUDA,
where the generator takes the portable path and only tests call this; an additive mask) a float32
matmul and a few MLX operations do. Queries are taken in chunks of rows when their logits would
pass MAX_LOGITS.

Also here, shared with the portable path: ``apply_mask`` (mlx-lm's attention masks applied to
logits), ``take_rows`` (a bank's rows per KV head in one gather); and ``causal_when_equal`` (a
boolean mask that is the causal one becomes "causal").
"""

from __future__ import annotations

import functools
from typing import Any

import mlx.core as mx

from services.generator import fused_attention, kernel_parts

NEG = -1e30  # finite "masked" for local logits: exp() gives exactly 0 next to any real logit
# Queries per sequence (L) from which a fused prefill takes this path instead of the attend kernel.
MIN_QUERIES = 32
# Most float32 local logits ([B, H, L, S]) materialized at once for the log-sum-exp (256 MiB): a
# longer batch of queries is merged in chunks of query rows; a context so long that MIN_QUERIES
# rows exceed it takes the attend kernel (or the portable path). _MERGE_MMA materializes none but
# takes the same chunks (one rule for both kernels).
MAX_LOGITS = 1 << 26
# Query and key dtypes whose local logits the CUDA merge kernel computes itself (_MERGE_MMA).
MMA_DTYPES = (mx.float16, mx.bfloat16)


def apply_mask(logits: mx.array, mask: Any, L: int, S: int) -> mx.array:
    """Applies an mlx-lm attention mask (None, "causal", a bool or additive array [B | 1, 1, L, S]
    or [L, S]) to [B, KVH, R, L, S] logits; masked positions get NEG."""
    if mask is None:
        return logits
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unsupported attention mask {mask!r}")
        mask = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
    if mask.ndim == 4:  # [B, 1 or H, L, S] -> broadcast over the n_rep axis
        mask = mx.expand_dims(mask, 2)
    if mask.dtype == mx.bool_:
        return mx.where(mask, logits, NEG)
    return logits + mask.astype(logits.dtype)


def take_rows(bank: mx.array, rows: mx.array, kv_head: mx.array) -> mx.array:
    """bank [KVH, N, d]; rows (int32, >= 0) and kv_head (int32, broadcastable to rows) -> the rows
    ``bank[kv_head, rows]`` [*shape, d] in the bank's dtype, gathered through a flat [KVH * N, d]
    view (row j of KV head g sits at g * N + j): one gather for every head."""
    kvh, n, d = bank.shape
    flat = rows + kv_head * n
    return mx.take(bank.reshape(kvh * n, d), flat.reshape(-1), axis=0).reshape(*flat.shape, d)


def causal_when_equal(mask: Any) -> Any:
    """``"causal"`` for a boolean mask [B | 1, 1, L, S] or [L, S] that equals the causal mask of
    its last L positions (queries at S - L ... S - 1), else ``mask`` unchanged.

    mlx-lm's batch KV cache builds a boolean mask for every prompt chunk, padded or not, where its
    single-sequence cache passes "causal"; MLX's fused attention takes an array mask only on a
    slower path (on CUDA 2-3x per prefill layer: docs/architecture.md, "Prefill with memories").
    Deciding needs one small read from the device: the same mask objects reach every layer of a
    forward (two where sliding-window layers alternate with global ones), so the answers are
    remembered until ``forget_masks``."""
    if mask is None or isinstance(mask, str) or mask.dtype != mx.bool_ or mask.ndim not in (2, 4):
        return mask
    L, S = mask.shape[-2:]
    if L == 1 or L > S or (mask.ndim == 4 and mask.shape[1] != 1):
        return mask
    known = _causal_answers.get(id(mask))
    if known is None or known[0] is not mask:
        causal = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
        known = (mask, bool(mx.array_equal(mx.broadcast_to(causal, mask.shape), mask).item()))
        if len(_causal_answers) >= 4:
            _causal_answers.clear()
        _causal_answers[id(mask)] = known  # holds the mask: its id is not reused while remembered
    return "causal" if known[1] else mask


_causal_answers: dict = {}


def forget_masks() -> None:
    """Drops the masks remembered for a forward's layers: ``causal_when_equal``'s answers and
    ``fused_attention.mask_mode``'s conversion. Called after each scheduler step and Memorize
    chunk, so a long prompt chunk's mask is not held past its forward."""
    _causal_answers.clear()
    fused_attention.forget_mask()


@functools.cache
def tensor_cores() -> bool:
    """Whether this GPU runs ``mma.sync.m16n8k16`` on 16-bit inputs (_MERGE_MMA): compute
    capability 8.0 and later; ptxas refuses the instruction for 7.5 (Turing), which keeps the
    float32 logits kernel."""
    return int(mx.device_info().get("compute_capability_major", 0)) >= 8


def fits(B: int, H: int, L: int, S: int) -> bool:
    """Whether a call of these sizes takes this path: a long batch of queries (L >= MIN_QUERIES)
    whose local logits stay under MAX_LOGITS for chunks of at least MIN_QUERIES query rows."""
    return L >= MIN_QUERIES and B * H * MIN_QUERIES * S <= MAX_LOGITS


# The merge of a prefill on CUDA: each (b, h, l) query row's log-sum-exp of its local logits
# (masked: causal by position, or the [B, L, S] bool array), then the softmax weights of the
# memories against it and the weighted sum. Two kernels differ in where the log-sum-exp comes
# from: _MERGE_LOGITS reads the float32 logits of a matmul (one warp per query row, lane i taking
# columns i, i + 32, ...); _MERGE_MMA computes them itself, 16 query rows of one head per warp
# by tensor-core products of 16-bit queries and keys (kernel_parts.MMA_HEADER), so that a
# 16-bit model's prefill needs no float32 copies of q and k and no logits in memory
# (docs/architecture.md, "Prefill with memories"). Both then take _MERGE_ROW per query row.
# inputs: logits [B, KVH, rep * L, S] float32 (q . k, unscaled; _MERGE_LOGITS) or q [B, H, L, D]
# and k [B, KVH, S, D] (_MERGE_MMA, any strides), mask [B, L, S] bool (MASK == 2; else
# unused), local [B, H, L, D] (the fused attention's output), mem_rows / mem_dots [B, H, L, K],
# bank_values [KVH, N, D] (contiguous), scale [1] float32. outputs: out [B, L, H * D], mass
# [B, H, L] float32. Inputs other than the bank's values and the mask (fused_attention.mask_mode
# makes it contiguous) are read through their strides.
_MERGE_LOGITS = """
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
    const float x = lr[(size_t)p * logits_strides[3]] * sc;
    if (x > m) { sum = sum * expf(m - x) + 1.f; m = x; }
    else sum += expf(x - m);
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float om = __shfl_xor_sync(0xffffffff, m, o);
    const float os = __shfl_xor_sync(0xffffffff, sum, o);
    const float top = fmaxf(m, om);
    sum = (m == NEG_INF ? 0.f : sum * expf(m - top)) + (om == NEG_INF ? 0.f : os * expf(om - top));
    m = top;
  }
  // No allowed local position: a finite "log 0", as the element-wise path's masked logits give.
  const float lse = m == NEG_INF ? -1e30f : m + logf(sum);
  {
"""

_MERGE_MMA = """
  const int B = q_shape[0];
  const int H = q_shape[1];
  const int L = q_shape[2];
  const int KVH = k_shape[1];
  const int S = k_shape[2];
  const int K = mem_rows_shape[3];
  const int N = bank_values_shape[1];
  const int rep = H / KVH;
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
  const float sc = scale[0];
  const float NEG_INF = __int_as_float(0xff800000);

  // The warp's query rows l0 ... l0 + 15 as the product's A tiles (rows past L are zeros).
  const Tq* qb = q + (size_t)b * q_strides[0] + (size_t)h * q_strides[1];
  unsigned a[D / 16][4];
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int lq = l0 + gid + (r & 1) * 8;
      const Tq* qe = qb + (size_t)lq * q_strides[2] + (size_t)(ks * 16 + tig * 2 + (r >> 1) * 8) * q_strides[3];
      a[ks][r] = lq < L ? em_pack2(qe[0], qe[q_strides[3]]) : 0u;
    }
  }
  // Logits of 8 local positions at a time; this lane keeps the online log-sum-exp (m, s) of its
  // two rows (l0 + gid, l0 + gid + 8) over its columns, then the row's 4 lanes combine theirs.
  const Tq* kb = k + (size_t)b * k_strides[0] + (size_t)g * k_strides[1];
  const int last = min(L, l0 + 16) - 1;
  const int end = MASK == 1 ? min(S, S - L + last + 1) : S;
  float m[2] = {NEG_INF, NEG_INF}, s[2] = {0.f, 0.f};
  for (int n0 = 0; n0 < end; n0 += 8) {
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    const int n = n0 + gid;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      unsigned kf[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const Tq* ke = kb + (size_t)n * k_strides[2] + (size_t)(ks * 16 + tig * 2 + r * 8) * k_strides[3];
        kf[r] = n < S ? em_pack2(ke[0], ke[k_strides[3]]) : 0u;
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
      if (!ok) continue;
      const float x = c[j] * sc;
      if (x > m[i]) { s[i] = s[i] * expf(m[i] - x) + 1.f; m[i] = x; }
      else s[i] += expf(x - m[i]);
    }
  }
  __shared__ float lse_all[(T / 32) * 16];
  float* lse_w = lse_all + warp * 16;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    for (int o = 1; o < 4; o <<= 1) {
      const float om = __shfl_xor_sync(0xffffffff, m[i], o);
      const float os = __shfl_xor_sync(0xffffffff, s[i], o);
      const float top = fmaxf(m[i], om);
      s[i] = (m[i] == NEG_INF ? 0.f : s[i] * expf(m[i] - top)) + (om == NEG_INF ? 0.f : os * expf(om - top));
      m[i] = top;
    }
    // No allowed local position: a finite "log 0", as the element-wise path's masked logits give.
    if (tig == 0) lse_w[gid + i * 8] = m[i] == NEG_INF ? -1e30f : m[i] + logf(s[i]);
  }
  __syncwarp();
  for (int i = 0; i < 16 && l0 + i < L; ++i) {  // the same bound in every lane
    const int l = l0 + i;
    const int row = (b * H + h) * L + l;
    const float lse = lse_w[i];
"""

# One query row (b, h, l) = row of [B, H, L], its KV head g and local log-sum-exp lse: the
# memories' weights against it (lane j < K holds memory j), the weighted sum, the outputs.
_MERGE_ROW = """
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
    for (int j = 0; j < K; ++j) {
      const float w = __shfl_sync(0xffffffff, e_j, j);
      const int n = __shfl_sync(0xffffffff, n_j, j);
      if (n < 0) continue;
      const Tv* vr = bank_values + ((size_t)g * N + n) * D;
#pragma unroll
      for (int u = 0; u < E; ++u) {
        const int e = lane + 32 * u;
        if (e < D) acc[u] += w * static_cast<float>(vr[e]);
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

_MERGE_THREADS = 128


@functools.cache
def _merge_kernel(mma: bool = False):
    """The merge kernel: from the float32 logits, or (``mma``) computing them from 16-bit q and k."""
    first = ["q", "k"] if mma else ["logits"]
    return mx.fast.cuda_kernel(
        name="extmind_prefill_merge_mma" if mma else "extmind_prefill_merge",
        input_names=[*first, "mask", "local", "mem_rows", "mem_dots", "bank_values", "scale"],
        output_names=["out", "mass"],
        source=(_MERGE_MMA if mma else _MERGE_LOGITS) + _MERGE_ROW,
        header=kernel_parts.MMA_HEADER if mma else "",
        ensure_row_contiguous=False,
    )


def attend(q, k, v, mask, mem_rows, mem_dots, bank_values, scale: float, out_dtype):
    """One softmax over [memories | local context] for every query head and token, the local part
    by ``mx.fast.scaled_dot_product_attention``.

    q [B, H, L, d] rotated queries; k, v [B, KVH, S, d] the local keys (rotated) and values;
    ``mask`` as mlx-lm passes it (None, "causal", a bool or additive array); mem_rows / mem_dots
    [B, H, L, k] (int32 rows into the bank, -1 = masked by the threshold; float32 raw q . k) as
    ``fused_attention.top_k_rows`` returns them; bank_values [KVH, N, d]. Returns (out [B, L, H * d]
    in ``out_dtype``, mass [B, H, L] float32: each head's attention weight on its memories), as
    ``fused_attention.attend`` does. The local output comes back from the fused attention in q's
    dtype (a half-precision model's output is rounded there, before the merge). On CUDA the
    merge is one kernel (_MERGE_MMA for q and k of one 16-bit dtype on compute capability >= 8.0,
    else _MERGE_LOGITS; no mask,
    a boolean or causal one; an additive one takes the element-wise path).

    Queries are taken in chunks whose local logits stay under MAX_LOGITS: a causal chunk sees only
    the keys up to its last query, so with the keys cut there it is causal again ("causal" to the
    fused attention); an array mask is cut to the chunk's rows."""
    B, H, L, d = q.shape
    S = k.shape[2]
    step = max(MIN_QUERIES, MAX_LOGITS // (B * H * S))
    if L <= step:
        return _attend(q, k, v, mask, mem_rows, mem_dots, bank_values, scale, out_dtype)
    outs, masses = [], []
    for lo in range(0, L, step):
        hi = min(L, lo + step)
        kc, vc, mc = k, v, mask
        if isinstance(mask, str):  # "causal": query l sees the keys up to S - L + l
            kc, vc = k[:, :, : S - L + hi], v[:, :, : S - L + hi]
        elif mask is not None:
            mc = mask[..., lo:hi, :]
        rows = (slice(None), slice(None), slice(lo, hi))
        out, mass = _attend(q[rows], kc, vc, mc, mem_rows[rows], mem_dots[rows], bank_values, scale, out_dtype)
        outs.append(out)
        masses.append(mass)
    return mx.concatenate(outs, axis=1), mx.concatenate(masses, axis=2)


def _attend(q, k, v, mask, mem_rows, mem_dots, bank_values, scale: float, out_dtype):
    """``attend`` for one chunk of queries (all of them when their logits fit MAX_LOGITS)."""
    B, H, L, d = q.shape
    kvh, S = k.shape[1], k.shape[2]
    rep = H // kvh
    local = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)  # [B, H, L, d]
    kernel_mask = fused_attention.mask_mode(mask, B, L, S) if fused_attention.enabled() else None
    # 16-bit queries and keys: the merge kernel computes their logits itself (tensor cores).
    mma = kernel_mask is not None and q.dtype in MMA_DTYPES and k.dtype == q.dtype and d % 16 == 0 and tensor_cores()
    if not mma:
        # GQA as a plain batched matmul: a KV head's R query heads stacked as rows.
        dots = q.astype(mx.float32).reshape(B, kvh, rep * L, d) @ k.astype(mx.float32).swapaxes(-1, -2)
    if kernel_mask is None:
        return _merge(dots * scale, mask, local, mem_rows, mem_dots, bank_values, scale, out_dtype)
    mode, mask_arr = kernel_mask
    per_block = _MERGE_THREADS // 32
    # _MERGE_MMA: a warp per 16 query rows of one head; _MERGE_LOGITS: a warp per query row.
    warps = B * H * -(-L // 16) if mma else B * H * L
    template = [("Tv", bank_values.dtype), ("To", out_dtype), ("D", d), ("T", _MERGE_THREADS), ("MASK", mode)]
    if mma:
        template += [("Tq", q.dtype), ("BF", int(q.dtype == mx.bfloat16))]
    out, mass = _merge_kernel(mma)(
        inputs=[
            *([q, k] if mma else [dots]),
            mask_arr,
            local,
            mem_rows,
            mem_dots,
            bank_values,
            kernel_parts.scalar(float(scale), mx.float32),
        ],
        template=template,
        grid=(-(-warps // per_block) * _MERGE_THREADS, 1, 1),
        threadgroup=(_MERGE_THREADS, 1, 1),
        output_shapes=[(B, L, H * d), (B, H, L)],
        output_dtypes=[out_dtype, mx.float32],
    )
    return out, mass


def _merge(logits, mask, local, mem_rows, mem_dots, bank_values, scale: float, out_dtype):
    """The merge of ``attend`` in MLX operations (any backend): logits [B, KVH, rep * L, S]
    float32, scaled; local [B, H, L, d]; the rest as ``attend`` takes them."""
    B, H, L, d = local.shape
    kvh, S = logits.shape[1], logits.shape[3]
    rep = H // kvh
    logits = apply_mask(logits.reshape(B, kvh, rep, L, S), mask, L, S)
    lse = mx.logsumexp(logits, axis=-1).reshape(B, H, L)
    valid = mem_rows >= 0
    mem = mx.where(valid, mem_dots * scale, -mx.inf)  # [B, H, L, k]
    top = mx.maximum(lse, mx.max(mem, axis=-1))  # finite: masked local logits are NEG, not -inf
    w_local = mx.exp(lse - top)
    e = mx.exp(mem - top[..., None])  # 0 where masked
    z = w_local + mx.sum(e, axis=-1)  # >= 1: one of the terms is exp(0)
    # Each head's memories from its KV head's bank.
    kv_head = (mx.arange(H, dtype=mx.int32) // rep)[None, :, None, None]
    values = take_rows(bank_values, mx.where(valid, mem_rows, 0), kv_head)
    out_mem = (e[..., None, :] @ values.astype(mx.float32))[..., 0, :]  # [B, H, L, d]
    # A query with no local position to attend (left padding) and memories weighs its local
    # output 0: whatever the fused attention returned for it must not reach the sum.
    local = mx.where(w_local[..., None] > 0, local.astype(mx.float32) * w_local[..., None], 0.0)
    out = (local + out_mem) / z[..., None]
    mass = mx.sum(e, axis=-1) / z
    return out.transpose(0, 2, 1, 3).reshape(B, L, H * d).astype(out_dtype), mass
