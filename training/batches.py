"""One training step's data for training/train.py, as arrays: fact documents (the memory), questions
about them with their answer masks, in-context questions, and the targets of the retrieval and
subject losses. Everything comes from training/facts.py and a seed."""

from __future__ import annotations

import random

import mlx.core as mx
import numpy as np

from training import facts

EVAL_SEED = 987_654  # held-out people for the progress numbers (benchmarks use other seeds)


def _pad(rows: list[list[int]], pad: int, multiple: int = 8) -> np.ndarray:
    L = max(len(r) for r in rows)
    L = -(-L // multiple) * multiple
    out = np.full((len(rows), L), pad, dtype=np.int32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def qa_arrays(tok, prompts: list[str], answers: list[str], pad: int):
    """-> inputs [B, L], targets [B, L], mask [B, L] (1 on the answer tokens' targets)."""
    p_ids = [e.ids for e in tok.encode_batch(prompts)]
    a_ids = [e.ids for e in tok.encode_batch([a + "\n" for a in answers], add_special_tokens=False)]
    seqs = [p + a for p, a in zip(p_ids, a_ids)]
    x = _pad([s[:-1] for s in seqs], pad)
    y = _pad([s[1:] for s in seqs], pad)
    m = np.zeros_like(x, dtype=np.float32)
    for i, (p, a) in enumerate(zip(p_ids, a_ids)):
        m[i, len(p) - 1 : len(p) - 1 + len(a)] = 1.0
    return x, y, m


def make_batch(
    tok,
    step_seed: int,
    n_mem: int,
    n_q: int,
    n_ctx: int,
    pad: int,
    bos: int,
    own: int = 0,
    multi: float = 0.3,
    max_people: int = 3,
):
    """One step's data: memory documents (1 person; with probability ``multi`` 2 to
    ``max_people``), questions about people in them, and in-context questions. ``own`` > 0:
    question i is about document i and sees documents i .. i + own - 1 (its own memory)."""
    rng = random.Random(step_seed)
    docs, stated, doc_people = [], [], []  # stated: (entity, attribute, doc index)
    for i in range(n_mem):
        people = facts.make_entities(rng, 1 if rng.random() < 1.0 - multi else rng.randint(2, max_people))
        text, attrs = facts.multi_document(rng, people)
        docs.append(text)
        doc_people.append(people)
        stated += [(e, a, i) for e, al in zip(people, attrs) for a in al]
    d_enc = tok.encode_batch(docs)
    d = _pad([e.ids for e in d_enc], pad, 16)
    valid = (d != pad) & (d != bos)
    subj_pos, subj_doc = subject_targets(tok, docs, d_enc, doc_people, d.shape[1], valid)
    if own:  # question i is about document i; it sees documents i .. i + own - 1
        picks = [rng.choice([x for x in stated if x[2] == i]) for i in range(n_mem)]
    else:
        picks = rng.sample(stated, min(n_q, len(stated)))
    qas = [facts.question(rng, e, a) for e, a, _ in picks]
    qx, qy, qm = qa_arrays(tok, [q.question for q in qas], [q.answer for q in qas], pad)
    ctx_picks = rng.sample(stated, min(n_ctx, len(stated)))
    cqas = [facts.question(rng, e, a) for e, a, _ in ctx_picks]
    cx, cy, cm = qa_arrays(
        tok, [facts.context_prompt(docs[i], q) for (_, _, i), q in zip(ctx_picks, cqas)], [q.answer for q in cqas], pad
    )
    rows = np.flatnonzero(valid.reshape(-1)).astype(np.int32)
    groups = (np.arange(n_mem)[:, None] + np.arange(max(own, 1))[None]) % n_mem
    ret_sel, ret_pos = retrieval_targets(docs, d_enc, picks, None if own else rows, d.shape[1], qm, max(own, 1))
    ret_doc = np.zeros((1, 1), dtype=np.float32)  # the shared bank's rows of each position's document
    if not own:
        row_doc = rows // d.shape[1]
        q_doc = np.array([i for _, _, i in picks])[ret_sel // qm.shape[1]]
        ret_doc = (row_doc[None, :] == q_doc[:, None]).astype(np.float32)
    subj_q = _name_ids(tok, [e for e, _, _ in picks])[ret_sel // qm.shape[1]]  # ret_sel: the answer positions
    return dict(
        subj_pos=subj_pos,
        subj_doc=subj_doc,
        subj_q=subj_q,
        docs=d,
        valid=valid,
        rows=rows,
        groups=groups.astype(np.int32),
        qx=qx,
        qy=qy,
        qm=qm,
        cx=cx,
        cy=cy,
        cm=cm,
        ret_sel=ret_sel,
        ret_pos=ret_pos,
        ret_doc=ret_doc,
    )


_NAME_TOKENS = 8  # a full name is 2-6 tokens of the trained tokenizer; -1 pads


def _name_ids(tok, people) -> np.ndarray:
    """-> int32 [len(people), _NAME_TOKENS]: the tokens of " First Last" (as a question spells
    it), -1 padded."""
    out = np.full((len(people), _NAME_TOKENS), -1, dtype=np.int32)
    for i, e in enumerate(people):
        ids = tok.encode(" " + e.name, add_special_tokens=False).ids[:_NAME_TOKENS]
        out[i, : len(ids)] = ids
    return out


def subject_targets(tok, docs, d_enc, doc_people, doc_len: int, valid: np.ndarray):
    """Supervision for the subject loss (``--w-subj``): every document token is labelled with
    the name of the person its paragraph is about (paragraphs are newline-separated, one person
    each, in ``doc_people`` order).

    -> pos int32 [P] (flat d * doc_len + t, the valid tokens) and names int32 [P, _NAME_TOKENS]."""
    pos, names = [], []
    for i, (doc, people) in enumerate(zip(docs, doc_people)):
        ends = np.cumsum([len(p) + 1 for p in doc.split("\n")])  # paragraph j: chars < ends[j]
        ids = _name_ids(tok, people)
        for t, (s, _) in enumerate(d_enc[i].offsets):
            if t < doc_len and valid[i, t]:
                pos.append(i * doc_len + t)
                names.append(ids[min(int(np.searchsorted(ends, s, side="right")), len(people) - 1)])
    return np.array(pos, dtype=np.int32), np.array(names, dtype=np.int32).reshape(-1, _NAME_TOKENS)


def retrieval_targets(docs, d_enc, picks, rows, doc_len: int, qm: np.ndarray, own: int = 1):
    """Supervision for retrieval (the ``--w-ret`` loss): the memory rows that hold the sentence
    stating each question's answer.

    ``rows``: the shared bank's rows (flat document positions), or None for per-question
    memories (``own`` documents each, the question's own first: its rows are its positions).
    -> sel int32 [P]: flat indices (b * L + l) of the question positions that predict answer
    tokens (qm's ones), and pos float32 [P, N]: 1 on the bank rows of the answer sentence of
    that position's question."""
    if rows is not None:
        inv = np.full(len(docs) * doc_len, -1, dtype=np.int64)
        inv[rows] = np.arange(len(rows))
    per_q = []
    for e, a, i in picks:
        lo, hi = facts.answer_span(docs[i], e, a)
        toks = np.array([j for j, (s, t) in enumerate(d_enc[i].offsets) if t > lo and s < hi], dtype=np.int64)
        r = toks if rows is None else (inv[i * doc_len + toks] if len(toks) else toks)
        per_q.append(r[r >= 0])
    sel = np.flatnonzero(qm.reshape(-1) > 0).astype(np.int32)
    pos = np.zeros((len(sel), own * doc_len if rows is None else len(rows)), dtype=np.float32)
    for p, flat in enumerate(sel):
        pos[p, per_q[flat // qm.shape[1]]] = 1.0
    return sel, pos


def eval_batch(tok, seed: int, n: int, pad: int, bos: int):
    pairs = facts.eval_set(seed, n)
    d = _pad([e.ids for e in tok.encode_batch([doc for doc, _ in pairs])], pad, 16)
    qx, qy, qm = qa_arrays(tok, [q.question for _, q in pairs], [q.answer for _, q in pairs], pad)
    cx, cy, cm = qa_arrays(tok, [facts.context_prompt(doc, q) for doc, q in pairs], [q.answer for _, q in pairs], pad)
    valid = (d != pad) & (d != bos)
    return dict(
        docs=d,
        valid=valid,
        rows=np.flatnonzero(valid.reshape(-1)).astype(np.int32),
        qx=qx,
        qy=qy,
        qm=qm,
        cx=cx,
        cy=cy,
        cm=cm,
    )


def to_mx(b: dict) -> dict:
    return {k: mx.array(v) for k, v in b.items()}
