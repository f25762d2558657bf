"""A differentiable forward pass of an mlx-lm Llama with extended-mind memories (training side).

It computes exactly what the generator's extended attention computes at inference (see
docs/extended-mind.md): memories are the raw (pre-RoPE) keys and values of documents, every query
head retrieves its own top-k rows by cosine(rotated query, raw key), and one softmax covers
[memory logits | causal local logits]. Differences are only in layout: the memory of a training
step is one [KVH, N, d] bank shared by all questions of the step (the documents' rows minus BOS
and padding), and a batch of questions retrieves from it at once.

The top-k selection is not differentiable; gradients flow through the gathered keys and values
(into the document forward that produced them) and through the queries, as in Memorizing
Transformers.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

_NEG = -1e30


@dataclass
class Bank:
    """One layer's memory: raw keys and values [KVH, N, d] (float32), shared by every question;
    or, with ``mask`` [B, N] (False = padding), one memory per question: [B, KVH, N, d], which
    is attended whole (no top-k)."""

    keys: mx.array
    values: mx.array
    mask: mx.array | None = None


def _local_mask(L: int) -> mx.array:
    return mx.arange(L)[:, None] >= mx.arange(L)[None]


def extended_attention(
    q: mx.array, k: mx.array, v: mx.array, bank: Bank, top_k: int, scale: float, sims: list | None = None
) -> mx.array:
    """q: rotated queries [B, H, L, d]; k, v: rotated local keys / values [B, KVH, L, d].
    -> attention output [B, H, L, d] (float32). ``sims``: receives the retrieval cosines
    [KVH, B * rep * L, N] (tests check the top-k margin with it)."""
    B, H, L, d = q.shape
    kvh = k.shape[1]
    rep = H // kvh
    if bank.mask is not None:
        return _own_memory_attention(q, k, v, bank, scale)
    n = bank.keys.shape[1]
    kk = min(top_k, n)
    qf = q.astype(mx.float32).reshape(B, kvh, rep, L, d)
    m = B * rep * L
    qm = qf.transpose(1, 0, 2, 3, 4).reshape(kvh, m, d)  # [KVH, M, d]
    if top_k >= n:
        # Every row is retrieved: plain attention over the whole memory (the order of the rows
        # does not matter inside the softmax).
        mem_logits = (qm @ bank.keys.swapaxes(-1, -2)) * scale  # [KVH, M, N]
        vsel = None
    else:
        # Retrieval: exact cosine, no gradient (the selection is discrete).
        qn = qm * mx.rsqrt(mx.maximum(mx.sum(qm * qm, axis=-1, keepdims=True), 1e-24))
        kn = bank.keys * mx.rsqrt(mx.maximum(mx.sum(bank.keys * bank.keys, axis=-1, keepdims=True), 1e-24))
        sim = mx.stop_gradient(qn @ kn.swapaxes(-1, -2))  # [KVH, M, N]
        if sims is not None:
            sims.append(sim)
        idx = mx.argpartition(-sim, kth=kk - 1, axis=-1)[..., :kk]
        flat = (idx.astype(mx.int32) + (mx.arange(kvh, dtype=mx.int32) * n)[:, None, None]).reshape(-1)
        ksel = mx.take(bank.keys.reshape(kvh * n, d), flat, axis=0).reshape(kvh, m, kk, d)
        vsel = mx.take(bank.values.reshape(kvh * n, d), flat, axis=0).reshape(kvh, m, kk, d)
        mem_logits = mx.sum(qm[:, :, None, :] * ksel, axis=-1) * scale  # raw dot, not the cosine

    def to_attn(x):  # [KVH, B * rep * L, ...] -> [B, KVH, rep, L, ...]
        x = x.reshape(kvh, B, rep, L, *x.shape[2:])
        return x.transpose(1, 0, 2, 3, *range(4, x.ndim))

    mem_logits = to_attn(mem_logits)
    local = (qf.reshape(B, kvh, rep * L, d) @ k.astype(mx.float32).swapaxes(-1, -2)) * scale
    local = mx.where(_local_mask(L), local.reshape(B, kvh, rep, L, L), _NEG)
    w = mx.softmax(mx.concatenate([mem_logits, local], axis=-1), axis=-1)
    if vsel is None:
        wm = w[..., :kk].transpose(1, 0, 2, 3, 4).reshape(kvh, m, kk)
        out_mem = (wm @ bank.values).reshape(kvh, B, rep, L, d).transpose(1, 0, 2, 3, 4)
    else:
        out_mem = mx.sum(w[..., :kk, None] * to_attn(vsel), axis=-2)
    out_local = w[..., kk:].reshape(B, kvh, rep * L, L) @ v.astype(mx.float32)
    return (out_mem + out_local.reshape(B, kvh, rep, L, d)).reshape(B, H, L, d)


def retrieval_loss(
    q: mx.array, bank: Bank, sel: mx.array, pos: mx.array, tau: float, within: mx.array | None = None, w_within=0.0
) -> mx.array:
    """Supervised retrieval (training only): for each selected query position and every query
    head, a softmax over cosine(rotated query, raw key) / tau across the whole shared bank, and
    the negative log of its mass on the positive rows (the sentence that states the answer).
    The top-k selection itself gives no gradient to rows it does not pick; this loss is what
    teaches queries and keys to find the right rows among thousands.

    q [B, H, L, d]; bank keys [KVH, N, d]; sel int32 [P] (flat b * L + l); pos float32 [P, N].
    ``within`` float32 [P, N] (1 on the rows of the question's own document), weighted by
    ``w_within``: adds the same loss with the softmax over those rows only, which asks for the
    answer's sentence among its person's other facts (the whole-bank loss is mostly won by
    finding the right document).
    -> scalar (mean over positions with at least one positive row, and heads)."""
    B, H, L, d = q.shape
    kvh = bank.keys.shape[0]
    rep = H // kvh
    qs = q.astype(mx.float32).transpose(1, 0, 2, 3).reshape(kvh, rep, B * L, d)
    qs = mx.take(qs, sel, axis=2)  # [KVH, rep, P, d]
    qn = qs * mx.rsqrt(mx.maximum(mx.sum(qs * qs, axis=-1, keepdims=True), 1e-24))
    kn = bank.keys * mx.rsqrt(mx.maximum(mx.sum(bank.keys * bank.keys, axis=-1, keepdims=True), 1e-24))
    logits = (qn @ kn[:, None].swapaxes(-1, -2)) / tau  # [KVH, rep, P, N]
    lse_all = mx.logsumexp(logits, axis=-1)
    lse_pos = mx.logsumexp(mx.where(pos > 0, logits, _NEG), axis=-1)
    has = (pos.sum(axis=-1) > 0).astype(mx.float32)  # [P]
    loss = ((lse_all - lse_pos) * has).sum() / (mx.maximum(has.sum(), 1.0) * kvh * rep)
    if within is not None and w_within > 0:
        lse_doc = mx.logsumexp(mx.where(within > 0, logits, _NEG), axis=-1)
        loss = loss + w_within * ((lse_doc - lse_pos) * has).sum() / (mx.maximum(has.sum(), 1.0) * kvh * rep)
    return loss


def own_retrieval_loss(q: mx.array, bank: Bank, sel: mx.array, pos: mx.array, tau: float, *_) -> mx.array:
    """``retrieval_loss`` for per-question memories (``own_banks``): each selected position's
    softmax runs over its own question's memory rows only.

    q [B, H, L, d]; bank keys [B, KVH, N, d] with mask [B, N]; sel int32 [P] (flat b * L + l);
    pos float32 [P, N] (1 on the rows of the answer's sentence). -> scalar."""
    B, H, L, d = q.shape
    kvh = bank.keys.shape[1]
    rep = H // kvh
    qs = q.astype(mx.float32).reshape(B, kvh, rep, L, d).transpose(0, 3, 1, 2, 4).reshape(B * L, kvh, rep, d)
    qs = mx.take(qs, sel, axis=0)  # [P, KVH, rep, d]
    b = sel // L
    keys = mx.take(bank.keys, b, axis=0)  # [P, KVH, N, d]
    qn = qs * mx.rsqrt(mx.maximum(mx.sum(qs * qs, axis=-1, keepdims=True), 1e-24))
    kn = keys * mx.rsqrt(mx.maximum(mx.sum(keys * keys, axis=-1, keepdims=True), 1e-24))
    logits = (qn @ kn.swapaxes(-1, -2)) / tau  # [P, KVH, rep, N]
    logits = mx.where(mx.take(bank.mask, b, axis=0)[:, None, None, :], logits, _NEG)
    lse_all = mx.logsumexp(logits, axis=-1)
    lse_pos = mx.logsumexp(mx.where(pos[:, None, None, :] > 0, logits, _NEG), axis=-1)
    has = (pos.sum(axis=-1) > 0).astype(mx.float32)  # [P]
    return ((lse_all - lse_pos) * has[:, None, None]).sum() / (mx.maximum(has.sum(), 1.0) * kvh * rep)


def _own_memory_attention(q, k, v, bank: Bank, scale: float) -> mx.array:
    """Every question attends to all rows of its own memory [B, KVH, N, d] and its local context."""
    B, H, L, d = q.shape
    kvh = k.shape[1]
    rep = H // kvh
    n = bank.keys.shape[2]
    qf = q.astype(mx.float32).reshape(B, kvh, rep * L, d)
    mem = (qf @ bank.keys.swapaxes(-1, -2)) * scale  # [B, KVH, R*L, N]
    mem = mx.where(bank.mask[:, None, None, :], mem, _NEG).reshape(B, kvh, rep, L, n)
    local = (qf @ k.astype(mx.float32).swapaxes(-1, -2)) * scale
    local = mx.where(_local_mask(L), local.reshape(B, kvh, rep, L, L), _NEG)
    w = mx.softmax(mx.concatenate([mem, local], axis=-1), axis=-1)
    out = w[..., :n].reshape(B, kvh, rep * L, n) @ bank.values + w[..., n:].reshape(B, kvh, rep * L, L) @ v.astype(
        mx.float32
    )
    return out.reshape(B, H, L, d)


def own_banks(captured, valid: mx.array, groups: mx.array) -> list[Bank]:
    """One memory per question: groups [B, G] int32 = the documents whose rows question b sees
    (its own and G - 1 distractors); valid [D, L] as in the documents batch."""
    B, G = groups.shape
    mask = valid[groups].reshape(B, -1)
    banks = []
    for k, v in captured:
        D, kvh, L, d = k.shape

        def gather(x, kvh=kvh, L=L, d=d):
            x = x[groups]  # [B, G, KVH, L, d]
            return x.transpose(0, 2, 1, 3, 4).reshape(B, kvh, G * L, d).astype(mx.float32)

        banks.append(Bank(gather(k), gather(v), mask))
    return banks


def forward(
    model,
    tokens: mx.array,
    banks: list[Bank] | None = None,
    top_k: int = 10,
    capture: bool = False,
    ret: tuple[mx.array, mx.array, float] | None = None,
    ret_losses: list | None = None,
    sims: list | None = None,
    normed: list | None = None,
):
    """tokens [B, L] int32 (positions from 0) -> (logits [B, L, V], captured).

    ``banks`` (one per layer): attend to memories. ``capture``: also return, per layer, the raw
    pre-RoPE keys and the values [B, KVH, L, d] (what Memorize stores). ``ret`` = (sel, pos, tau)
    (pos over the shared bank's rows, or over each question's own memory rows): appends each
    layer's retrieval loss (layers >= 1: layer 0's queries see only their own token, so they
    cannot tell documents apart) to ``ret_losses``. ``normed``: receives each layer's normalized
    attention input [B, L, hidden] (what its queries, keys and values are projected from), for
    the subject loss of training/objectives.py."""
    inner = model.model
    h = inner.embed_tokens(tokens)
    B, L = tokens.shape
    captured = []
    for i, layer in enumerate(inner.layers):
        a = layer.self_attn
        x = layer.input_layernorm(h)
        if normed is not None:
            normed.append(x)
        q = a.q_proj(x).reshape(B, L, a.n_heads, -1).transpose(0, 2, 1, 3)
        k = a.k_proj(x).reshape(B, L, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = a.v_proj(x).reshape(B, L, a.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if capture:
            captured.append((k, v))
        q, k = a.rope(q), a.rope(k)
        if banks is None:
            o = mx.fast.scaled_dot_product_attention(q, k, v, scale=a.scale, mask="causal")
        else:
            o = extended_attention(q, k, v, banks[i], top_k, a.scale, sims).astype(x.dtype)
            if ret is not None and i > 0:
                loss_fn = retrieval_loss if banks[i].mask is None else own_retrieval_loss
                ret_losses.append(loss_fn(q, banks[i], *ret))
        h = h + a.o_proj(o.transpose(0, 2, 1, 3).reshape(B, L, -1))
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    h = inner.norm(h)
    logits = inner.embed_tokens.as_linear(h) if model.args.tie_word_embeddings else model.lm_head(h)
    return logits, captured


def banks_from_capture(captured, rows: mx.array) -> list[Bank]:
    """Shared memory of a batch of documents: captured [(k, v) [B, KVH, L, d]] per layer and
    rows (int32 [N], indices into the flattened B * L tokens: BOS and padding left out)
    -> one Bank per layer with N rows."""
    banks = []
    for k, v in captured:
        B, kvh, L, d = k.shape
        banks.append(
            Bank(
                mx.take(k.transpose(1, 0, 2, 3).reshape(kvh, B * L, d), rows, axis=1).astype(mx.float32),
                mx.take(v.transpose(1, 0, 2, 3).reshape(kvh, B * L, d), rows, axis=1).astype(mx.float32),
            )
        )
    return banks
