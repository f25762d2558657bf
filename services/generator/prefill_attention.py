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
MLX's flash attention does the same work several times faster. Here only the local logits'
log-sum-exp is computed apart (one float32 matmul and a reduction), and the memories (k per
query head and token) are a few element-wise ops.

Also here: ``apply_mask``, mlx-lm's attention masks applied to logits, shared with the portable path.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

NEG = -1e30  # finite "masked" for local logits: exp() gives exactly 0 next to any real logit
# Queries per sequence (L) from which a fused prefill takes this path instead of the attend kernel.
MIN_QUERIES = 32
# Most float32 local logits ([B, H, L, S]) one call materializes for the log-sum-exp; past it the
# attend kernel (or the portable path) runs.
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


def fits(B: int, H: int, L: int, S: int) -> bool:
    """Whether a call of these sizes takes this path: a long batch of queries whose local logits
    stay under MAX_LOGITS."""
    return L >= MIN_QUERIES and B * H * L * S <= MAX_LOGITS


def attend(q, k, v, mask, mem_rows, mem_dots, bank_values, scale: float, out_dtype):
    """One softmax over [memories | local context] for every query head and token, the local part
    by ``mx.fast.scaled_dot_product_attention``.

    q [B, H, L, d] rotated queries; k, v [B, KVH, S, d] the local keys (rotated) and values;
    ``mask`` as mlx-lm passes it (None, "causal", a bool or additive array); mem_rows / mem_dots
    [B, H, L, k] (int32 rows into the bank, -1 = masked by the threshold; float32 raw q . k) as
    ``fused_attention.top_k_rows`` returns them; bank_values [KVH, N, d]. Returns (out [B, L, H * d]
    in ``out_dtype``, mass [B, H, L] float32: each head's attention weight on its memories), as
    ``fused_attention.attend`` does. The local output comes back from the fused attention in q's
    dtype (a half-precision model's output is rounded there, before the merge)."""
    B, H, L, d = q.shape
    kvh, S = k.shape[1], k.shape[2]
    rep = H // kvh
    n = bank_values.shape[1]
    local = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)  # [B, H, L, d]
    # GQA as a plain batched matmul: a KV head's R query heads stacked as rows.
    logits = (q.astype(mx.float32).reshape(B, kvh, rep * L, d) @ k.astype(mx.float32).swapaxes(-1, -2)) * scale
    logits = apply_mask(logits.reshape(B, kvh, rep, L, S), mask, L, S)
    lse = mx.logsumexp(logits, axis=-1).reshape(B, H, L)
    valid = mem_rows >= 0
    mem = mx.where(valid, mem_dots * scale, -mx.inf)  # [B, H, L, k]
    top = mx.maximum(lse, mx.max(mem, axis=-1))  # finite: masked local logits are NEG, not -inf
    w_local = mx.exp(lse - top)
    e = mx.exp(mem - top[..., None])  # 0 where masked
    z = w_local + mx.sum(e, axis=-1)  # >= 1: one of the terms is exp(0)
    # Each head's memories from its KV head's bank, through a flat [KVH * N, d] view.
    flat = mx.where(valid, mem_rows, 0) + (mx.arange(H, dtype=mx.int32) // rep * n)[None, :, None, None]
    values = mx.take(bank_values.reshape(kvh * n, d), flat.reshape(-1), axis=0).reshape(*mem_rows.shape, d)
    out_mem = (e[..., None, :] @ values.astype(mx.float32))[..., 0, :]  # [B, H, L, d]
    # A query with no local position to attend (left padding) and memories weighs its local
    # output 0: whatever the fused attention returned for it must not reach the sum.
    local = mx.where(w_local[..., None] > 0, local.astype(mx.float32) * w_local[..., None], 0.0)
    out = (local + out_mem) / z[..., None]
    mass = mx.sum(e, axis=-1) / z
    return out.transpose(0, 2, 1, 3).reshape(B, L, H * d).astype(out_dtype), mass
