"""The training objectives of training/train.py and its progress numbers: answer cross-entropy
with memories (extended attention, training/extended_forward.py), document LM, in-context QA,
the supervised retrieval losses and the subject loss; teacher-forced accuracy by memory size."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from training.batches import EVAL_SEED, eval_batch, to_mx
from training.extended_forward import banks_from_capture, forward, own_banks


def _ce(logits, y, m):
    """-> (mean masked cross-entropy, per-sequence exact match [B] (every masked token argmax-right))."""
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), y, reduction="none")
    loss = (ce * m).sum() / mx.maximum(m.sum(), 1.0)
    wrong = ((mx.argmax(logits, axis=-1) != y) * m).sum(axis=-1)
    return loss, (wrong == 0)


def subject_loss(model, normed: list, pos: mx.array, names: mx.array) -> mx.array:
    """Asks the normalized attention input of layers >= 1 at ``pos`` (flat b * L + t) for the
    person it is about: cross-entropy of ``x @ E^T`` (E: the tied token embeddings, a logit lens
    with no extra weights) against the person's name tokens ``names`` [P, T] (-1 padded; uniform
    over them). Keys and values are projected from that input, so a fact's memory rows can then
    say whose fact they hold; the LM loss alone never asks for it, the facts being random.
    -> scalar (mean over positions and layers)."""
    emb = model.model.embed_tokens.weight
    ok = (names >= 0).astype(mx.float32)
    total = mx.array(0.0)
    for x in normed[1:]:
        xs = mx.take(x.reshape(-1, x.shape[-1]), pos, axis=0).astype(mx.float32)
        logits = xs @ emb.astype(mx.float32).T
        logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(logp, mx.maximum(names, 0), axis=-1)
        total = total - ((picked * ok).sum(-1) / mx.maximum(ok.sum(-1), 1.0)).mean()
    return total / max(len(normed) - 1, 1)


def losses(
    model,
    b,
    top_k: int,
    w_lm: float,
    w_ctx: float,
    own: bool,
    w_ret: float = 0.0,
    tau: float = 0.1,
    w_subj: float = 0.0,
    w_ret_doc: float = 0.0,
):
    docs = b["docs"]
    normed_d: list | None = [] if w_subj > 0 else None
    logits_d, cap = forward(model, docs, capture=True, normed=normed_d)
    lm_mask = b["valid"][:, 1:].astype(mx.float32)
    lm, _ = _ce(logits_d[:, :-1], docs[:, 1:], lm_mask)
    banks = own_banks(cap, b["valid"], b["groups"]) if own else banks_from_capture(cap, b["rows"])
    ret_losses: list = []
    ret = (b["ret_sel"], b["ret_pos"], tau, b["ret_doc"], w_ret_doc / max(w_ret, 1e-9)) if w_ret > 0 else None
    normed_q: list | None = [] if w_subj > 0 else None
    logits_q, _ = forward(model, b["qx"], banks=banks, top_k=top_k, ret=ret, ret_losses=ret_losses, normed=normed_q)
    qa, qa_ok = _ce(logits_q, b["qy"], b["qm"])
    logits_c, _ = forward(model, b["cx"])
    ctx, ctx_ok = _ce(logits_c, b["cy"], b["cm"])
    rl = sum(ret_losses) / len(ret_losses) if ret_losses else mx.array(0.0)
    subj = mx.array(0.0)
    if w_subj > 0:
        subj = 0.5 * (
            subject_loss(model, normed_d, b["subj_pos"], b["subj_doc"])
            + subject_loss(model, normed_q, b["ret_sel"], b["subj_q"])
        )
    total = qa + w_lm * lm + w_ctx * ctx + w_ret * rl + w_subj * subj
    return total, (qa, lm, ctx, qa_ok.astype(mx.float32).mean(), ctx_ok.astype(mx.float32).mean(), rl, subj)


def evaluate(model, b, top_k: int) -> dict:
    _, cap = forward(model, b["docs"], capture=True)
    banks = banks_from_capture(cap, b["rows"])
    lq, _ = forward(model, b["qx"], banks=banks, top_k=top_k)
    _, mem_ok = _ce(lq, b["qy"], b["qm"])
    ln, _ = forward(model, b["qx"])
    _, none_ok = _ce(ln, b["qy"], b["qm"])
    lc, _ = forward(model, b["cx"])
    _, ctx_ok = _ce(lc, b["cy"], b["cm"])
    return {
        k: float(v.astype(mx.float32).mean()) for k, v in (("memory", mem_ok), ("none", none_ok), ("context", ctx_ok))
    }


def memory_curve(model, tok, pad: int, bos: int, sizes=(1, 4, 16, 64, 256), questions: int = 256) -> dict:
    """Teacher-forced memory accuracy (top_k 10) with n held-out documents in one shared memory,
    n in ``sizes``: ~1/n when the model retrieves by attribute and cannot tell people apart."""
    out = {}
    for n in sizes:
        accs = [
            evaluate(model, to_mx(eval_batch(tok, EVAL_SEED + 7 * n + g, n, pad, bos)), 10)["memory"]
            for g in range(max(1, questions // n))
        ]
        out[n] = round(float(np.mean(accs)), 3)
    return out
