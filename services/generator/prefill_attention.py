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
computed apart (one float32 matmul); on CUDA one kernel takes their log-sum-exp and merges the
memories (k per query head and token), elsewhere a few MLX operations do. Queries are taken in
chunks of rows when their logits would pass MAX_LOGITS.

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
# rows exceed it takes the attend kernel (or the portable path).
MAX_LOGITS = 1 << 26


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


def fits(B: int, H: int, L: int, S: int) -> bool:
    """Whether a call of these sizes takes this path: a long batch of queries (L >= MIN_QUERIES)
    whose local logits stay under MAX_LOGITS for chunks of at least MIN_QUERIES query rows."""
    return L >= MIN_QUERIES and B * H * MIN_QUERIES * S <= MAX_LOGITS


# The merge of a prefill on CUDA, one warp per (b, h, l) query row (T / 32 rows per block): the
# log-sum-exp of the row's local logits (masked: causal by position, or the [B, L, S] bool array),
# then the softmax weights of the memories against it and the weighted sum, lane i taking
# columns i, i + 32, ... inputs: logits [B, KVH, rep * L, S] float32 (q . k, unscaled), mask
# [B, L, S] bool (MASK == 2; else unused), local [B, H, L, D] (the fused attention's output),
# mem_rows / mem_dots [B, H, L, K], bank_values [KVH, N, D], scale [1] float32. outputs: out
# [B, L, H * D], mass [B, H, L] float32.
_MERGE_SOURCE = """
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
  const float* lr = logits + (((size_t)b * KVH + g) * rep * L + (size_t)(h % rep) * L + l) * S;
  float m = NEG_INF, sum = 0.f;
  for (int p = lane; p < local_end; p += 32) {
    if (MASK == 2 && !mask[((size_t)b * L + l) * S + p]) continue;
    const float x = lr[p] * sc;
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

  // The memories: lane j < K holds memory j's logit.
  const int n_j = lane < K ? mem_rows[(size_t)row * K + lane] : -1;
  const float x_j = n_j >= 0 ? mem_dots[(size_t)row * K + lane] * sc : NEG_INF;
  float top = fmaxf(lse, x_j);
  for (int o = 16; o > 0; o >>= 1) top = fmaxf(top, __shfl_xor_sync(0xffffffff, top, o));
  const float e_j = n_j >= 0 ? expf(x_j - top) : 0.f;
  float e_sum = e_j;
  for (int o = 16; o > 0; o >>= 1) e_sum += __shfl_xor_sync(0xffffffff, e_sum, o);
  const float w_local = expf(lse - top);
  const float z = w_local + e_sum;  // >= 1: one of the terms is exp(0)

  constexpr int E = (D + 31) / 32;
  float acc[E];
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const int e = lane + 32 * i;
    // A row with no allowed local position weighs the local output 0, whatever it holds.
    acc[i] = (e < D && w_local > 0.f) ? w_local * static_cast<float>(local[(size_t)row * D + e]) : 0.f;
  }
  for (int j = 0; j < K; ++j) {
    const float w = __shfl_sync(0xffffffff, e_j, j);
    const int n = __shfl_sync(0xffffffff, n_j, j);
    if (n < 0) continue;
    const Tv* vr = bank_values + ((size_t)g * N + n) * D;
#pragma unroll
    for (int i = 0; i < E; ++i) {
      const int e = lane + 32 * i;
      if (e < D) acc[i] += w * static_cast<float>(vr[e]);
    }
  }
#pragma unroll
  for (int i = 0; i < E; ++i) {
    const int e = lane + 32 * i;
    if (e < D) out[(((size_t)b * L + l) * H + h) * D + e] = static_cast<To>(acc[i] / z);
  }
  if (lane == 0) mass[row] = e_sum / z;
"""
_MERGE_THREADS = 128


@functools.cache
def _merge_kernel():
    return mx.fast.cuda_kernel(
        name="extmind_prefill_merge",
        input_names=["logits", "mask", "local", "mem_rows", "mem_dots", "bank_values", "scale"],
        output_names=["out", "mass"],
        source=_MERGE_SOURCE,
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
    merge is one kernel (a boolean or causal mask; an additive one takes the element-wise path).

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
    # GQA as a plain batched matmul: a KV head's R query heads stacked as rows.
    dots = q.astype(mx.float32).reshape(B, kvh, rep * L, d) @ k.astype(mx.float32).swapaxes(-1, -2)
    kernel_mask = fused_attention.mask_mode(mask, B, L, S) if fused_attention.enabled() else None
    if kernel_mask is None:
        return _merge(dots * scale, mask, local, mem_rows, mem_dots, bank_values, scale, out_dtype)
    mode, mask_arr = kernel_mask
    per_block = _MERGE_THREADS // 32
    out, mass = _merge_kernel()(
        inputs=[
            dots,
            mask_arr,
            local,
            mem_rows,
            mem_dots,
            bank_values,
            kernel_parts.scalar(float(scale), mx.float32),
        ],
        template=[("Tv", bank_values.dtype), ("To", out_dtype), ("D", d), ("T", _MERGE_THREADS), ("MASK", mode)],
        grid=(-(-(B * H * L) // per_block) * _MERGE_THREADS, 1, 1),
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
