"""Extended mind attention (docs/extended-mind.md) plugged into mlx-lm's own attention modules.

``install(model)`` replaces every ``layer.self_attn`` of an mlx-lm Llama / Mistral / Qwen2 / Qwen3
model, or a mixture-of-experts one (Qwen2-MoE, Qwen3-MoE, Mixtral: the experts live in the MLP),
with ``ExtendedMindAttention``, which holds the stock module and reuses its projections, its
``rope`` (llama3 scaling included) and Qwen3's ``q_norm``/``k_norm``. Which models qualify and
their shapes: ``services/generator/attention_parts.py``. What a forward call does
is decided by the shared ``ExtendedMindState``:

The state is shared because mlx-lm's model ``__call__`` has no argument that could carry a
request's memories down to the attention layers; whoever runs a forward on the MLX thread (the
scheduler for a decode step, the memory builder for a window) sets it around that forward.

- ``state.memory`` is None, or the layer does not retrieve: the stock module runs unchanged
  (bit-identical to stock mlx-lm);
- ``state.capture`` is a list: the raw pre-RoPE keys and the values of every layer are
  appended to it (memory building) and the stock module computes the output;
- otherwise every query token retrieves its own top-k memories and attends to them and to the
  local context with one fp32 softmax.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention

from services.generator import attention_parts, fused_attention, fused_projections, prefill_attention
from services.generator.citations import Picks
from services.generator.fused_projections import MergedLinear
from services.generator.prefill_attention import apply_mask, take_rows
from services.generator.request_types import DEFAULT_MEMORY_TOP_K


@dataclass
class Retrieved:
    """Top-k memories of every query head and token of one layer, in the [B, KVH, n_rep, L, k]
    layout of the attention (query head h = kv_head * n_rep + r)."""

    dots: mx.array  # raw q . k_mem (float32)
    valid: mx.array | None  # bool; False = masked by the similarity threshold
    values: mx.array  # [B, KVH, n_rep, L, k, d] float32
    indices: mx.array  # int rows into the memory set (for citations); -1 where masked


class Retriever(Protocol):
    rows: int

    def retrieve(self, layer: int, queries: mx.array, top_k: int, threshold: float | None) -> Retrieved:
        """queries: rotated, float32, [B, KVH, n_rep, L, d]."""


@dataclass
class MemoryContext:
    """What one forward call attends to: a retriever over the request's memories + settings."""

    retriever: Retriever
    top_k: int = DEFAULT_MEMORY_TOP_K
    threshold: float | None = None
    layers: frozenset[int] | None = None  # None = all layers
    # When a list, every layer appends (layer, citations.Picks) here (citations): the rows each
    # query head retrieved [B, H, L, k] (-1 = masked by the threshold) and, when
    # ``cite_min_weight`` > 0, what their softmax weights are computed from when counted.
    record: list | None = None
    cite_min_weight: float = 0.0
    # When a list, every layer appends (layer, share [B, H, L] float32) here: each query head's
    # attention weight on the memories (services/generator/attention_mass.py).
    mass: list | None = None
    # Set when a layer recorded through the portable path: its records are graphs over the
    # forward's arrays until evaluated (the fused kernels' records are outputs of the kernels that
    # compute the step, evaluated with it). The scheduler resets it around each step.
    records_lazy: bool = False

    def applies(self, layer: int) -> bool:
        return self.top_k > 0 and self.retriever.rows > 0 and (self.layers is None or layer in self.layers)


@dataclass
class ExtendedMindState:
    memory: MemoryContext | None = None
    capture: list | None = None  # (layer, raw keys [B, KVH, L, d], values [B, KVH, L, d])
    num_layers: int = 0
    modules: list = field(default_factory=list)
    shape: attention_parts.AttentionShape | None = None  # from the config (attention_parts.resolve)
    # id -> cache of the per-layer KV caches whose batch has no left padding (set by the scheduler
    # around a decode step, docs/architecture.md "Decode without a mask"): a one-token forward on
    # them attends to every cached position, so the all-true mask mlx-lm builds is dropped and
    # attention takes the fused decode kernel (an array mask sends MLX CUDA to its unfused
    # fallback). The dict holds the caches themselves so that no id is reused while it is set.
    unpadded_caches: dict = field(default_factory=dict)
    # LOCAL retrieval and attention in fused kernels (services/generator/fused_attention.py):
    # set at install from ``fused_attention.enabled()`` (on the CUDA backend, unless turned off).
    fused: bool = False
    # Modules whose projections run merged (fused_projections.merge): attentions and MLPs.
    merged_projections: int = 0


def local_top_k(
    keys_t: mx.array, inv_key_norms: mx.array, values: mx.array, queries: mx.array, top_k: int, threshold: float | None
) -> Retrieved:
    """Exact cosine top-k on the device: keys_t [KVH, d, N] (the bank's keys, transposed once when
    the bank is made) and values [KVH, N, d] in the bank's dtype (float32, float16 or bfloat16),
    inv_key_norms [KVH, N] float32, queries [B, KVH, n_rep, L, d] float32.
    One [B * n_rep * L, d] x [d, N] product per KV head: a plain batched matmul, ~5x faster on the
    CPU than broadcasting the bank over the batch and repeat axes (and ~5x faster again than the
    same product over [N, d] keys, which the CPU matmul copies transposed at every call). The
    product is taken in float32 (a half-precision bank is widened exactly for it), so the ranking
    does not depend on the bank's dtype; the picked values come back widened to float32.

    A decode step (L == 1) runs one compiled graph per (top_k, threshold, shapes): its dozen
    small element-wise ops fuse, which halves the retrieval's per-token cost."""
    top = (
        _compiled_top_k(top_k, threshold)
        if queries.shape[3] == 1
        else functools.partial(_top_k, top_k=top_k, threshold=threshold)
    )
    dots, values, indices, *valid = top(keys_t, inv_key_norms, values, queries)
    return Retrieved(dots=dots, valid=valid[0] if valid else None, values=values, indices=indices)


def _top_k(keys_t, inv_key_norms, values, queries, top_k: int, threshold: float | None):
    """``local_top_k`` as (dots, values, indices[, valid when there is a threshold])."""
    kvh, d, n = keys_t.shape
    B, _, rep, L, _ = queries.shape
    m = B * rep * L
    k = min(top_k, n)
    q = queries.transpose(1, 0, 2, 3, 4).reshape(kvh, m, d)
    dots = q @ keys_t.astype(mx.float32)  # [KVH, M, N]
    q_inv = mx.rsqrt(mx.maximum(mx.sum(q * q, axis=-1, keepdims=True), 1e-24))
    sim = dots * q_inv * inv_key_norms[:, None, :]
    if k < n:
        idx = top_rows(sim, k)
    else:
        idx = mx.broadcast_to(mx.arange(n, dtype=mx.uint32), sim.shape)
    sel_dots = mx.take_along_axis(dots, idx, axis=-1)  # [KVH, M, k]
    valid = None
    rows = idx.astype(mx.int32)
    if threshold is not None:
        valid = mx.take_along_axis(sim, idx, axis=-1) > threshold
        rows = mx.where(valid, rows, -1)
    picked = rows if threshold is None else idx.astype(mx.int32)
    sel_values = take_rows(values, picked, mx.arange(kvh, dtype=mx.int32)[:, None, None]).astype(mx.float32)

    def to_attention_layout(x):  # [KVH, B * rep * L, ...] -> [B, KVH, rep, L, ...]
        x = x.reshape(kvh, B, rep, L, *x.shape[2:])
        return x.transpose(1, 0, 2, 3, *range(4, x.ndim))

    out = (to_attention_layout(sel_dots), to_attention_layout(sel_values), to_attention_layout(rows))
    return out if valid is None else (*out, to_attention_layout(valid))


def top_rows(sim: mx.array, k: int) -> mx.array:
    """The indices [..., k] (uint32, in no particular order) of the k largest entries of
    sim [..., N] along its last axis, k < N.

    Large N: in two stages, exactly. The rows are cut in blocks of b; the k blocks with the
    largest maxima hold every one of the k largest entries (a block left out has k blocks whose
    maxima beat its own, so each of its entries has k larger ones), so a partition over the block
    maxima and one over those k * b candidates replace one over all N (on the CPU a 512-token
    prefill over 4 096 rows spends most of its retrieval in that partition). Between equal
    entries at the k-th place either may be picked, as with one partition."""
    *lead, n = sim.shape
    b = 1 << max(0, round(math.log2(math.sqrt(n / k))))  # minimises n / b + k * b
    blocks = -(-n // b)
    if n < 1024 or blocks <= k:
        # A compact copy: a slice would keep the whole [..., N] partition alive for as long as
        # the recorded indices (citations) wait to be tallied.
        return mx.contiguous(mx.argpartition(-sim, kth=k - 1, axis=-1)[..., :k])
    if blocks * b != n:  # pad to whole blocks with entries that are never picked
        sim = mx.pad(sim, [(0, 0)] * len(lead) + [(0, blocks * b - n)], constant_values=-mx.inf)
    sim = sim.reshape(*lead, blocks, b)
    best = mx.argpartition(-mx.max(sim, axis=-1), kth=k - 1, axis=-1)[..., :k]  # [..., k] blocks
    cand = mx.take_along_axis(sim, best[..., None], axis=-2).reshape(*lead, k * b)
    pick = mx.argpartition(-cand, kth=k - 1, axis=-1)[..., :k]  # [..., k] places in cand
    return mx.take_along_axis(best, pick // b, axis=-1) * b + pick % b


@functools.lru_cache(maxsize=64)
def _compiled_top_k(top_k: int, threshold: float | None):
    """``_top_k`` compiled for one (top_k, threshold); MLX traces it again per input shapes."""
    return mx.compile(functools.partial(_top_k, top_k=top_k, threshold=threshold))


# One RoPE call for a layer's queries and keys when its projections are merged (_rotated).
ROPE_ONCE = True


class ExtendedMindAttention(nn.Module):
    def __init__(self, inner: nn.Module, layer: int, state: ExtendedMindState, n_heads: int, n_kv_heads: int):
        super().__init__()
        self.inner = inner
        self.layer = layer
        self._state = state
        # From the config: the stock modules name them differently (n_heads, Mixtral's num_heads).
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.scale = inner.scale
        # q_proj, k_proj and v_proj as one matmul (fused_projections.py), set by ``install`` once
        # the probe found this layer's attention the same computed either way; None: the stock
        # module's own projections, and the stock module itself when there are no memories.
        self.qkv: MergedLinear | None = None

    # The pre-RoPE projections exactly as mlx-lm's Llama/Qwen2/Qwen3 (and their MoE) attention computes them.
    def _project(self, x: mx.array):
        a = self.inner
        B, L, _ = x.shape
        if self.qkv is not None:  # one matmul; its heads split as views (no copy at any L)
            h, kvh = self.n_heads, self.n_kv_heads
            q, k, v = mx.split(self.qkv.stacked(x).reshape(B, L, h + 2 * kvh, -1), [h, h + kvh], axis=2)
        else:
            q = a.q_proj(x).reshape(B, L, self.n_heads, -1)
            k = a.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
            v = a.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
        if "q_norm" in a:
            q = a.q_norm(q)
        if "k_norm" in a:
            k = a.k_norm(k)
        return q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array, mask: Any = None, cache: Any = None) -> mx.array:
        state = self._state
        ctx = state.memory
        if mask is not None and cache is not None and x.shape[1] == 1 and state.unpadded_caches.get(id(cache)) is cache:
            mask = None
        elif mask is not None and x.shape[1] > 1:
            mask = prefill_attention.causal_when_equal(mask)
        if state.capture is not None:
            _, k, v = self._project(x)
            state.capture.append((self.layer, k, v))
        if ctx is None or not ctx.applies(self.layer):
            return self.inner(x, mask, cache) if self.qkv is None else self._stock(x, mask, cache)
        return self._with_memories(x, mask, cache, ctx)

    def _rotated(self, x: mx.array, cache: Any):
        """The queries and keys after RoPE (at the cache's offset) and the values, [B, heads, L, d]
        each. With merged projections and no per-head norms one RoPE call rotates the queries and
        the keys together, as views of one array (RoPE acts on each head alone: the same values
        as two calls), one operation fewer per layer."""
        a = self.inner
        offset = {} if cache is None else {"offset": cache.offset}
        if ROPE_ONCE and self.qkv is not None and "q_norm" not in a and "k_norm" not in a:
            B, L, _ = x.shape
            h, kvh = self.n_heads, self.n_kv_heads
            heads = self.qkv.stacked(x).reshape(B, L, h + 2 * kvh, -1).transpose(0, 2, 1, 3)
            qk = a.rope(heads[:, : h + kvh], **offset)
            return qk[:, :h], qk[:, h:], heads[:, h + kvh :]
        q, k, v = self._project(x)
        return a.rope(q, **offset), a.rope(k, **offset), v

    def _stock(self, x: mx.array, mask: Any, cache: Any) -> mx.array:
        """The stock module's computation (mlx-lm's Llama/Qwen attention, line for line) on the
        merged projections: what runs without memories once ``qkv`` is set."""
        a = self.inner
        B, L, _ = x.shape
        q, k, v = self._rotated(x, cache)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = scaled_dot_product_attention(q, k, v, cache=cache, scale=a.scale, mask=mask)
        return a.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def _with_memories(self, x, mask, cache, ctx: MemoryContext) -> mx.array:
        a = self.inner
        B, L, _ = x.shape
        q, k, v = self._rotated(x, cache)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        kvh, rep = self.n_kv_heads, self.n_heads // self.n_kv_heads
        d = q.shape[-1]
        S = k.shape[2]
        if self._state.fused:
            fused_out = self._fused(q, k, v, mask, ctx, x.dtype)
            if fused_out is not None:
                return a.o_proj(fused_out)
        qf = q.astype(mx.float32).reshape(B, kvh, rep, L, d)

        mem = ctx.retriever.retrieve(self.layer, qf, ctx.top_k, ctx.threshold)

        # GQA as plain batched matmuls: the R query heads of a KV head are stacked as rows
        # (broadcasting K over the R axis is several times slower on the CPU).
        local = (qf.reshape(B, kvh, rep * L, d) @ k.astype(mx.float32).swapaxes(-1, -2)) * self.scale
        local = apply_mask(local.reshape(B, kvh, rep, L, S), mask, L, S)  # [B, KVH, R, L, S]
        mem_logits = mem.dots * self.scale
        if mem.valid is not None:
            mem_logits = mx.where(mem.valid, mem_logits, -mx.inf)
        kmem = mem_logits.shape[-1]
        w = mx.softmax(mx.concatenate([mem_logits, local], axis=-1), axis=-1)
        weighed = ctx.record is not None and ctx.cite_min_weight > 0
        ctx.records_lazy = ctx.records_lazy or ctx.record is not None or ctx.mass is not None
        if weighed or ctx.mass is not None:  # each head's weight on its memories [B, H, L]
            mass = mx.sum(w[..., :kmem], axis=-1).reshape(B, self.n_heads, L)
        if ctx.record is not None:  # weights rebuilt when counted, as for the fused path
            rows = mem.indices.reshape(B, self.n_heads, L, -1)
            picks = Picks(rows, mem.dots.reshape(rows.shape), mass, self.scale) if weighed else Picks(rows)
            ctx.record.append((self.layer, picks))
        if ctx.mass is not None:  # lazy: computed only if the scheduler evaluates it
            ctx.mass.append((self.layer, mass))
        # Each query's own k memories: a weighted sum (one tiny matmul per query would be slower).
        out_mem = mx.sum(w[..., :kmem, None] * mem.values, axis=-2)  # [B, KVH, R, L, d]
        out_local = w[..., kmem:].reshape(B, kvh, rep * L, S) @ v.astype(mx.float32)
        out = out_mem + out_local.reshape(B, kvh, rep, L, d)
        out = out.reshape(B, self.n_heads, L, d).transpose(0, 2, 1, 3).reshape(B, L, -1)
        return a.o_proj(out.astype(x.dtype))

    def _fused(self, q, k, v, mask, ctx: MemoryContext, dtype):
        """The layer's attention output [B, L, H * d] from the fused kernels, or None when this
        call is not one they take (a retriever with neither a bank nor hit rows, a quantized KV
        cache, an additive mask, a head size or top-k past their limits, a context longer than a
        block's shared memory when not a prefill). LOCAL retrieval runs in the kernels; REMOTE
        hits go into them as rows (``_fused_remote``). A prefill (``prefill_attention.fits``)
        takes the local part from MLX's fused attention and merges the memories by log-sum-exp
        (prefill_attention.py)."""
        bank = getattr(ctx.retriever, "layer_bank", None)
        hits = getattr(ctx.retriever, "retrieve_rows", None)  # RemoteRetriever's
        B, H, L, d = q.shape
        if (bank is None and hits is None) or not isinstance(k, mx.array) or d > fused_attention.MAX_HEAD_DIM:
            return None
        S = k.shape[2]
        kk = min(ctx.top_k, ctx.retriever.rows)
        if kk > fused_attention.MAX_TOP_K:
            return None
        kernel_mask = fused_attention.mask_mode(mask, B, L, S)
        if kernel_mask is None:
            return None
        weighed = ctx.record is not None and ctx.cite_min_weight > 0
        if bank is None:
            got = self._fused_remote(hits, kk, q, k, v, mask, kernel_mask, ctx, dtype, weighed)
        else:
            got = self._fused_local(bank, kk, q, k, v, mask, kernel_mask, ctx, dtype, weighed)
        if got is None:
            return None
        out, mass, rows, dots, weighed = got
        if ctx.record is not None:
            ctx.record.append((self.layer, Picks(rows, dots, mass, self.scale) if weighed else Picks(rows)))
        if ctx.mass is not None:
            ctx.mass.append((self.layer, mass))
        return out

    def _fused_local(self, bank, kk: int, q, k, v, mask, kernel_mask, ctx: MemoryContext, dtype, weighed: bool):
        """``_fused`` for LOCAL retrieval (``bank``: LocalRetriever.layer_bank): (out, mass, rows,
        dots, whether the citations weigh the rows at the flush), or None past the kernels' limits."""
        B, H, L, d = q.shape
        S = k.shape[2]
        keys_t, inv_norms, values = bank(self.layer)
        kept = getattr(ctx.retriever, "prefill_keys", None)  # LocalRetriever's: kept (bank_cache)
        prefill_keys = functools.partial(kept, self.layer) if kept is not None else None
        if prefill_attention.fits(B, H, L, S):  # a prefill: local part by MLX's fused attention
            rows, dots = fused_attention.top_k_rows(q, keys_t, inv_norms, ctx.top_k, ctx.threshold, prefill_keys)
            out, mass = prefill_attention.attend(q, k, v, mask, rows, dots, values, self.scale, dtype)
            return out, mass, rows, dots, weighed
        if kk + S > fused_attention.max_local_positions():
            return None
        # The kernel floors the rows the citations count itself: a flush then joins rows alone.
        # Past MATMUL_ROWS query rows no kernel has the weights at hand (top_k_rows, then
        # attend): flooring there would be a weights graph per layer and forward, evaluated
        # one by one at the flush; weighed at the flush instead, in one graph.
        floored = weighed and B * H * L < fused_attention.MATMUL_ROWS
        floor = ctx.cite_min_weight if floored else 0.0
        out, mass, rows, dots = fused_attention.attend_top_k(
            q,
            k,
            v,
            kernel_mask,
            keys_t,
            inv_norms,
            values,
            ctx.top_k,
            ctx.threshold,
            self.scale,
            dtype,
            floor,
            prefill_keys,
        )
        return out, mass, rows, dots, weighed and not floored

    def _fused_remote(self, hits, kk: int, q, k, v, mask, kernel_mask, ctx: MemoryContext, dtype, weighed: bool):
        """``_fused`` for REMOTE retrieval: the memory service's hits (``hits``:
        RemoteRetriever.retrieve_rows) go into the attention kernels as their rows of memory
        values, one kernel where the portable path runs about twenty (the same logits and
        softmax). (out, mass, the hits' memory rows, dots, ``weighed``: the citations weigh them at
        the flush), or None past the kernels' limits; ``kk``: the hits per query, min(top_k, rows)."""
        B, H, L, d = q.shape
        S = k.shape[2]
        prefill = prefill_attention.fits(B, H, L, S)
        if not prefill and kk + S > fused_attention.max_local_positions():
            return None
        kvh = self.n_kv_heads
        qf = q.astype(mx.float32).reshape(B, kvh, H // kvh, L, d)
        got = hits(self.layer, qf, ctx.top_k, ctx.threshold, ctx.record is not None)
        attend = prefill_attention.attend if prefill else fused_attention.attend
        out, mass = attend(q, k, v, mask if prefill else kernel_mask, got.rows, got.dots, got.values, self.scale, dtype)
        return out, mass, got.indices, got.dots, weighed


def install(
    model: nn.Module, config: dict | None = None, fused: str = "auto", merge: bool = False
) -> ExtendedMindState:
    """Wraps every attention module of ``model`` (once); returns the shared state. ``config``: the
    model's config.json (default: the model's own ``args``); ``fused``: ``fused_attention.MODES``;
    ``merge``: merge each layer's projections where that computes the same (fused_projections.py).
    Raises attention_parts.UnsupportedModel (a ValueError naming what is missing) when extended
    mind cannot drive this model."""
    existing = getattr(model, "_extended_mind_state", None)
    if existing is not None:
        return existing
    shape = attention_parts.resolve(model, config)
    state = ExtendedMindState(num_layers=shape.num_layers, shape=shape, fused=fused_attention.enabled(fused))
    for i, layer in enumerate(model.layers):
        state.modules.append(ExtendedMindAttention(layer.self_attn, i, state, shape.num_heads, shape.num_kv_heads))
    dtype = attention_parts.compute_dtype(model)
    attention_parts.probe(state.modules, shape, dtype)
    if merge:
        state.merged_projections = fused_projections.merge(model, state.modules, dtype, shape.model_type)
    for layer, wrapper in zip(model.layers, state.modules):
        layer.self_attn = wrapper
    object.__setattr__(model, "_extended_mind_state", state)
    return state
