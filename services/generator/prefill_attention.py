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
by the merge kernel itself (tensor-core products, 16 query rows per thread block), else by one float32
matmul whose logits a merge kernel reads (one warp per query row); either kernel
(prefill_merge_kernels.py) then takes their log-sum-exp and merges the memories (k per query head
and token). Without the kernels (off CUDA,
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

from services.generator import fused_attention, kernel_parts, prefill_merge_kernels

NEG = -1e30  # finite "masked" for local logits: exp() gives exactly 0 next to any real logit
# Queries per sequence (L) from which a fused prefill takes this path instead of the attend kernel.
MIN_QUERIES = 32
# Most float32 local logits ([B, H, L, S]) materialized at once for the log-sum-exp (256 MiB): a
# longer batch of queries is merged in chunks of query rows; a context so long that MIN_QUERIES
# rows exceed it takes the attend kernel (or the portable path). prefill_merge_kernels.MERGE_MMA materializes none but
# takes the same chunks (one rule for both kernels).
MAX_LOGITS = 1 << 26
# Query and key dtypes whose local logits the CUDA merge kernel computes itself (prefill_merge_kernels.MERGE_MMA).
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
    """Whether this GPU runs ``mma.sync.m16n8k16`` on 16-bit inputs (prefill_merge_kernels.MERGE_MMA): compute
    capability 8.0 and later; ptxas refuses the instruction for 7.5 (Turing), which keeps the
    float32 logits kernel."""
    return fused_attention.compute_capability() >= (8, 0)


def fits(B: int, H: int, L: int, S: int) -> bool:
    """Whether a call of these sizes takes this path: a long batch of queries (L >= MIN_QUERIES)
    whose local logits stay under MAX_LOGITS for chunks of at least MIN_QUERIES query rows."""
    return L >= MIN_QUERIES and B * H * MIN_QUERIES * S <= MAX_LOGITS


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
    merge is one kernel (prefill_merge_kernels.MERGE_MMA for q and k of one 16-bit dtype on compute capability >= 8.0,
    else prefill_merge_kernels.MERGE_LOGITS; no mask,
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
    # MERGE_MMA: a block per 16 query rows of one head; MERGE_LOGITS: a warp per query row.
    per_block = prefill_merge_kernels.THREADS // 32
    blocks = B * H * -(-L // 16) if mma else -(-(B * H * L) // per_block)
    template = [
        ("Tv", bank_values.dtype),
        ("To", out_dtype),
        ("D", d),
        ("T", prefill_merge_kernels.THREADS),
        ("MASK", mode),
        ("G", prefill_merge_kernels.MERGE_GROUP),
    ]
    if mma:
        template += [("Tq", q.dtype), ("BF", int(q.dtype == mx.bfloat16))]
    out, mass = prefill_merge_kernels.merge_kernel(mma)(
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
        grid=(blocks * prefill_merge_kernels.THREADS, 1, 1),
        threadgroup=(prefill_merge_kernels.THREADS, 1, 1),
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
