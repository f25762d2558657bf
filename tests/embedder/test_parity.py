"""The MLX models against independent references on the same weights.

Qwen3-Embedding vs transformers' Qwen3Model (last-token pooling, one text at a time so no
padding is involved on the reference side), Qwen3-Reranker vs transformers' Qwen3ForCausalLM,
all-MiniLM-L6-v2 vs sentence-transformers. The MLX side runs through the engine and its batcher,
i.e. mixed-length right-padded batches.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from services.common.mlx_thread import MLXThread
from services.embedder import registry
from services.embedder.engine import EmbedderEngine
from services.embedder.models.qwen3_reranker import PREFIX, SUFFIX, body_text
from tests.ranking import assert_ranking_matches

DOCS = [
    "Paris is the capital of France.",
    "The river flows to the sea, and the sea rises into clouds that rain on the mountains again. " * 3,
    "Alice met Bob.",
    "Machine learning models turn text into vectors; similar meanings land close to each other.",
    "42",
]
QUERIES = ["What is the capital of France?", "who met at the station"]
TASK = "Given a question, retrieve passages that answer it"


def cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture
async def engine_for():
    made = []

    async def make(path, kind=None):
        mlx = MLXThread("test-mlx")
        model = mlx.call(registry.load, registry.resolve(str(path), kind))
        engine = EmbedderEngine([model], mlx)
        await engine.start()
        made.append(engine)
        return engine

    yield make
    for e in made:
        await e.stop()
        e.mlx.shutdown()


def qwen3_reference(path, texts, dims=None):
    from transformers import Qwen3Model

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    eot = tok.token_to_id("<|endoftext|>")
    model = Qwen3Model.from_pretrained(str(path), dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            ids = tok.encode(t).ids
            ids = ids if ids and ids[-1] == eot else ids + [eot]
            h = model(torch.tensor([ids])).last_hidden_state[0, -1].numpy()
            out.append(h)
    v = np.stack(out)
    if dims:
        v = v[:, :dims]
    return v / np.linalg.norm(v, axis=1, keepdims=True)


async def test_qwen3_documents_mixed_lengths_match_transformers(tiny_qwen3, engine_for):
    engine = await engine_for(tiny_qwen3)
    r = await engine.embed(DOCS)
    ref = qwen3_reference(tiny_qwen3, DOCS)
    assert r.vectors.shape == (len(DOCS), 64) and r.dimensions == 64
    assert len(set(r.token_counts)) > 2, "the batch must mix lengths"
    assert cos(r.vectors, ref).min() >= 0.9999
    assert np.allclose(np.linalg.norm(r.vectors, axis=1), 1, atol=1e-5)


async def test_qwen3_queries_with_instruction_and_dimensions(tiny_qwen3, engine_for):
    engine = await engine_for(tiny_qwen3)
    r = await engine.embed(QUERIES, input_type="query", instruction=TASK, dimensions=40)
    ref = qwen3_reference(tiny_qwen3, [f"Instruct: {TASK}\nQuery:{q}" for q in QUERIES], dims=40)
    assert r.vectors.shape == (2, 40) and r.dimensions == 40
    assert cos(r.vectors, ref).min() >= 0.9999
    # Default task when no instruction is given; documents never get one.
    d = await engine.embed(QUERIES, input_type="query")
    ref_default = qwen3_reference(
        tiny_qwen3,
        [
            f"Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:{q}"
            for q in QUERIES
        ],
    )
    assert cos(d.vectors, ref_default).min() >= 0.9999
    plain = await engine.embed(QUERIES)
    assert cos(plain.vectors, qwen3_reference(tiny_qwen3, QUERIES)).min() >= 0.9999


async def test_padding_invariance(tiny_qwen3, tiny_bert, engine_for):
    for path in (tiny_qwen3, tiny_bert):
        engine = await engine_for(path)
        alone = [(await engine.embed([t])).vectors[0] for t in DOCS]
        together = (await engine.embed(DOCS)).vectors
        shuffled = (await engine.embed(DOCS[::-1])).vectors[::-1]
        assert np.abs(np.stack(alone) - together).max() < 1e-5, path.name
        assert np.abs(together - shuffled).max() < 1e-5, path.name


def reranker_reference(path, query, docs, instruction):
    from transformers import Qwen3ForCausalLM

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    yes, no = tok.token_to_id("yes"), tok.token_to_id("no")
    model = Qwen3ForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    pre = tok.encode(PREFIX, add_special_tokens=False).ids
    suf = tok.encode(SUFFIX, add_special_tokens=False).ids
    scores = []
    with torch.no_grad():
        for d in docs:
            ids = pre + tok.encode(body_text(instruction, query, d), add_special_tokens=False).ids + suf
            logits = model(torch.tensor([ids])).logits[0, -1]
            scores.append(torch.softmax(logits[[no, yes]], dim=-1)[1].item())
    return np.array(scores)


async def test_reranker_scores_match_transformers(tiny_reranker, engine_for):
    engine = await engine_for(tiny_reranker, "reranker")
    query = "What is the capital of France?"
    name, ranked = await engine.rerank(query, DOCS, instruction=TASK)
    ref = reranker_reference(tiny_reranker, query, DOCS, TASK)
    got = np.zeros(len(DOCS))
    for r in ranked:
        got[r.index] = r.score
    assert np.abs(got - ref).max() <= 1e-4
    # The order is a discrete outcome: documents whose reference scores are within the score
    # tolerance may swap; anything else must be in the reference's order.
    assert_ranking_matches([r.index for r in ranked], ref, len(DOCS), eps=2e-4)
    _, top = await engine.rerank(query, DOCS, instruction=TASK, top_n=2)
    assert [r.index for r in top] == [r.index for r in ranked[:2]]


async def test_tiny_bert_matches_sentence_transformers(tiny_bert, engine_for):
    from sentence_transformers import SentenceTransformer

    engine = await engine_for(tiny_bert)
    ref = SentenceTransformer(str(tiny_bert), device="cpu").encode(DOCS, convert_to_numpy=True)
    got = (await engine.embed(DOCS)).vectors
    assert cos(got, ref).min() >= 0.999


async def test_minilm_matches_sentence_transformers_and_ranks_paraphrases(minilm_path, engine_for):
    from sentence_transformers import SentenceTransformer

    engine = await engine_for(minilm_path)
    texts = [
        "A man is playing a guitar.",
        "Someone strums a guitar on stage.",
        "The stock market fell sharply today.",
        "Shares dropped a lot in today's trading.",
        "How do I bake sourdough bread?",
        "Steps for making a sourdough loaf at home.",
    ]
    r = await engine.embed(texts)
    assert r.model == "sentence-transformers/all-MiniLM-L6-v2" and r.dimensions == 384
    ref = SentenceTransformer(str(minilm_path), device="cpu").encode(texts, convert_to_numpy=True)
    assert cos(r.vectors, ref).min() >= 0.999
    sim = r.vectors @ r.vectors.T
    for i in range(0, 6, 2):
        partner = sim[i, i + 1]
        unrelated = [sim[i, j] for j in range(6) if j not in (i, i + 1)]
        assert partner > max(unrelated) + 0.1, (texts[i], partner, unrelated)


async def test_quantized_mlx_checkpoint_loads_and_stays_close(tiny_qwen3, models_root, engine_for):
    """A 8-bit MLX checkpoint (mlx-lm's own quantizer and saver) loads through the same path."""
    import mlx.core as mx
    from mlx_lm.utils import quantize_model, save_config, save_model

    from services.embedder.models.qwen3_embedding import Qwen3Embedder

    out = models_root / "Qwen3-Embedding-tiny-8bit"

    def convert():
        m = Qwen3Embedder(tiny_qwen3, name="tiny")
        import json

        config = json.loads((tiny_qwen3 / "config.json").read_text())
        model, config = quantize_model(m.module, config, group_size=32, bits=8)
        save_model(out, model)
        save_config(config, out / "config.json")
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (out / f).write_bytes((tiny_qwen3 / f).read_bytes())
        mx.eval()

    mlx = MLXThread("convert")
    mlx.call(convert)
    mlx.shutdown()
    engine = await engine_for(out)
    q = (await engine.embed(DOCS)).vectors
    ref = qwen3_reference(tiny_qwen3, DOCS)
    assert cos(q, ref).min() >= 0.99


GOLDEN = os.environ.get("MLX_MODEL_QWEN3_0_6B_PATH", "")


@pytest.mark.slow
@pytest.mark.skipif(
    not GOLDEN or not os.path.isdir(GOLDEN),
    reason="real Qwen3-Embedding-0.6B weights absent (set MLX_MODEL_QWEN3_0_6B_PATH)",
)
async def test_golden_similarity_on_real_qwen3_0_6b(engine_for):
    engine = await engine_for(registry.resolve("qwen3-0.6b").path)
    task = "Given a web search query, retrieve relevant passages that answer the query"
    q = await engine.embed(["What is the capital of China?", "Explain gravity"], input_type="query", instruction=task)
    d = await engine.embed(
        [
            "The capital of China is Beijing.",
            "Gravity is a force that attracts two bodies towards each other. It gives weight to "
            "physical objects and is responsible for the movement of planets around the sun.",
        ]
    )
    sim = q.vectors @ d.vectors.T
    assert np.allclose(sim, [[0.7646, 0.1414], [0.1355, 0.6000]], atol=2e-3), sim
