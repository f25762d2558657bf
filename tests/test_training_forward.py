"""The training forward (training/extended_forward.py) computes what the generator computes.

The fact model is trained through a differentiable re-implementation of extended attention; if it
drifted from the generator's (services/generator/extended_attention.py), the model would be
trained for a different function than the one it is served with. Both run here on one tiny random
Llama: the memory captured by the training forward, attended with top-k by both, gives the same
logits; and the captured rows are what the generator's own capture (Memorize) stores.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load

from extmind.tiny_models import build_llama
from services.generator.bank_cache import LocalRetriever, bank_from_numpy
from services.generator.extended_attention import MemoryContext, install
from training.extended_forward import Bank, banks_from_capture, forward, own_retrieval_loss, retrieval_loss


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = build_llama(tmp_path_factory.mktemp("tf") / "m", hidden=64, layers=3, heads=4, kv_heads=2, seed=3)
    plain, _ = load(str(path))
    served, _ = load(str(path))
    return plain, served, install(served)


def test_capture_equals_the_generators_capture(models):
    plain, served, state = models
    doc = mx.array(np.random.default_rng(0).integers(3, 500, (1, 24)), dtype=mx.int32)
    _, captured = forward(plain, doc, capture=True)
    state.capture = []
    try:
        served(doc)
        mine = state.capture
    finally:
        state.capture = None
    assert len(mine) == len(captured) == 3
    for i, ((layer, k_gen, v_gen), (k_tr, v_tr)) in enumerate(zip(mine, captured)):
        assert layer == i
        np.testing.assert_allclose(np.array(k_tr), np.array(k_gen), atol=1e-6, rtol=0)
        np.testing.assert_allclose(np.array(v_tr), np.array(v_gen), atol=1e-6, rtol=0)


@pytest.mark.parametrize("top_k", [4, 100])  # a real selection, and the whole memory
def test_extended_attention_logits_equal_the_generators(models, top_k):
    plain, served, state = models
    rng = np.random.default_rng(1)
    docs = mx.array(rng.integers(3, 500, (2, 20)), dtype=mx.int32)
    _, captured = forward(plain, docs, capture=True)
    rows = mx.array(np.arange(40, dtype=np.int32))  # both documents, every position
    banks = banks_from_capture(captured, rows)
    question = mx.array(rng.integers(3, 500, (1, 9)), dtype=mx.int32)
    sims: list = []
    logits_tr, _ = forward(plain, question, banks=banks, top_k=top_k, sims=sims)
    if top_k < 40:  # a discrete selection: both sides pick the same rows only with a clear margin
        for sim in sims:
            ranked = -np.sort(-np.array(sim), axis=-1)
            gap = (ranked[..., top_k - 1] - ranked[..., top_k]).min()
            assert gap > 1e-4, f"top-{top_k} boundary within {gap:.1e}: pick another seed"

    keys = [np.array(b.keys) for b in banks]
    values = [np.array(b.values) for b in banks]
    bank = bank_from_numpy("m", "v1", keys, values)
    state.memory = MemoryContext(LocalRetriever([bank]), top_k=top_k)
    try:
        logits_gen = served(question)
    finally:
        state.memory = None
    a, b = np.array(logits_tr), np.array(logits_gen)
    assert np.abs(a - b).max() < 1e-4, np.abs(a - b).max()
    # and memories matter: without them the logits differ clearly
    assert np.abs(np.array(plain(question)) - b).max() > 1e-2


def test_own_memory_retrieval_loss_is_the_shared_loss_per_question():
    """own_retrieval_loss (per-question memories, padding masked) equals retrieval_loss run on
    each question's own rows as a shared bank, averaged over the supervised positions."""
    rng = np.random.default_rng(5)
    B, H, kvh, L, d, n = 2, 4, 2, 5, 8, 6
    q = mx.array(rng.standard_normal((B, H, L, d)).astype(np.float32))
    keys = rng.standard_normal((B, kvh, n + 3, d)).astype(np.float32)
    mask = np.zeros((B, n + 3), dtype=bool)
    mask[0, :n] = True  # question 0: 6 real rows, 3 padding rows
    mask[1, 2:] = True  # question 1: 7 real rows
    sel = np.array([1, 3, L + 2], dtype=np.int32)  # two positions of question 0, one of question 1
    pos = np.zeros((3, n + 3), dtype=np.float32)
    pos[0, [1, 2]] = pos[1, [4]] = pos[2, [2, 8]] = 1.0
    bank = Bank(mx.array(keys), mx.array(keys), mx.array(mask))
    own = own_retrieval_loss(q, bank, mx.array(sel), mx.array(pos), 0.1)
    parts = []
    for b, rows in ((0, [0, 1]), (1, [2])):
        keep = np.flatnonzero(mask[b])
        shared = Bank(mx.array(keys[b][:, keep]), mx.array(keys[b][:, keep]))
        local_sel = mx.array((sel[rows] - b * L).astype(np.int32))
        loss = retrieval_loss(q[b : b + 1], shared, local_sel, mx.array(pos[rows][:, keep]), 0.1)
        parts.append(float(loss) * len(rows))
    assert float(own) == pytest.approx(sum(parts) / 3, rel=1e-5)
    # a padding row marked positive must not count: question 0's row 8 is padding
    pos[0, 8] = 1.0
    again = own_retrieval_loss(q, bank, mx.array(sel), mx.array(pos), 0.1)
    assert float(again) == pytest.approx(float(own), rel=1e-6)


def test_named_documents_name_the_person_in_every_sentence(monkeypatch):
    import random

    from training import facts

    monkeypatch.setattr(facts, "NAMING", "named")
    rng = random.Random(5)
    for e in facts.make_entities(rng, 20):
        doc, attrs = facts.document(rng, e)
        sentences = [s for s in doc.split(". ") if s]
        stated = [s for s in sentences if any(e.attrs[a] in s for a in attrs)]
        assert len(stated) == len(attrs)
        assert all(e.name in s for s in stated), doc
