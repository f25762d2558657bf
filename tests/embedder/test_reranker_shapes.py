"""The Qwen3-Reranker-4B's checkpoint shapes: a tied or an untied LM head, in float and as an
mlx-lm 4-bit (group 64) checkpoint whose head is quantized too.

Float checkpoints are checked against transformers' Qwen3ForCausalLM. A quantized checkpoint is
checked against the same weights dequantized and saved as float: both hold exactly the same
numbers, so their scores agree to float32 rounding (the quantized path computes the matmuls from
packed weights) -- a tolerance on 4-bit error would hide a wrong head row or a mis-read scale.
"""

from __future__ import annotations

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import dequantize_model, load_model, quantize_model, save_config, save_model
from safetensors.numpy import load_file

from services.common.mlx_thread import MLXThread
from services.embedder import registry
from services.embedder.engine import EmbedderEngine

from .conftest import build_reranker
from .test_parity import DOCS, TASK, reranker_reference

QUERY = "What is the capital of France?"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def logit(p: np.ndarray) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def _copy_tokenizer(src, dst) -> None:
    for f in TOKENIZER_FILES:
        if (src / f).exists():
            (dst / f).write_bytes((src / f).read_bytes())


def quantized_pair(src, root) -> tuple:
    """``src`` as an mlx-lm 4-bit group-64 checkpoint, and those quantized weights dequantized
    into a float checkpoint -> (quantized dir, dequantized dir)."""
    q_dir, dq_dir = root / f"{src.name}-4bit", root / f"{src.name}-4bit-dequantized"
    if (q_dir / "config.json").exists():
        return q_dir, dq_dir

    def convert():
        lm, config = load_model(src)
        lm, q_config = quantize_model(lm, config, group_size=64, bits=4)
        save_model(q_dir, lm)
        save_config(q_config, q_dir / "config.json")
        lm, _ = load_model(q_dir)  # what the service will load, read back from disk
        lm = dequantize_model(lm)
        save_model(dq_dir, lm)
        save_config({k: v for k, v in q_config.items() if not k.startswith("quantization")}, dq_dir / "config.json")
        mx.eval()

    mlx = MLXThread("quantize")
    try:
        mlx.call(convert)
    finally:
        mlx.shutdown()
    for d in (q_dir, dq_dir):
        _copy_tokenizer(src, d)
    return q_dir, dq_dir


@pytest.fixture
async def scores_of():
    """scores_of(path) -> P(yes) of every DOCS entry for QUERY, through the engine and batcher."""
    mlx = MLXThread("reranker-shapes")
    engines = []

    async def score(path):
        model = mlx.call(registry.load, registry.resolve(str(path), "reranker"))
        engine = EmbedderEngine([model], mlx)
        await engine.start()
        engines.append(engine)
        _, ranked = await engine.rerank(QUERY, DOCS, instruction=TASK)
        got = np.zeros(len(DOCS))
        for r in ranked:
            got[r.index] = r.score
        return got, model

    yield score
    for e in engines:
        await e.stop()
    mlx.shutdown()


async def test_float_head_tied_or_untied_matches_transformers(tiny_reranker_4b, scores_of):
    config = json.loads((tiny_reranker_4b / "config.json").read_text())
    # The 4B's shape: more query heads x head_dim than hidden units (32 x 128 > 2560).
    assert config["num_attention_heads"] * config["head_dim"] > config["hidden_size"]
    weights = load_file(str(tiny_reranker_4b / "model.safetensors"))
    assert ("lm_head.weight" in weights) != config["tie_word_embeddings"]
    got, model = await scores_of(tiny_reranker_4b)
    ref = reranker_reference(tiny_reranker_4b, QUERY, DOCS, TASK)
    assert np.abs(got - ref).max() <= 1e-4, (got, ref)
    # Also as logits (log-odds of yes over no), which a saturated probability would not show.
    assert np.abs(logit(got) - logit(ref)).max() <= 1e-4, (logit(got), logit(ref))
    estimate = registry.estimate_bytes(registry.resolve(str(tiny_reranker_4b), "reranker"))
    assert model.nbytes == estimate + 2 * config["hidden_size"] * 4


async def test_4bit_checkpoint_with_quantized_head_matches_its_dequantized_weights(
    tiny_reranker_4b, models_root, scores_of
):
    q_dir, dq_dir = quantized_pair(tiny_reranker_4b, models_root)
    config = json.loads((q_dir / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    packed = load_file(str(q_dir / "model.safetensors"))
    head = "model.embed_tokens" if config["tie_word_embeddings"] else "lm_head"
    assert f"{head}.scales" in packed and packed[f"{head}.weight"].dtype == np.uint32  # the head is 4-bit
    assert "lm_head.weight" not in packed or not config["tie_word_embeddings"]

    quantized, q_model = await scores_of(q_dir)
    dequantized, _ = await scores_of(dq_dir)
    assert isinstance(q_model.body.layers[0].mlp.down_proj, nn.QuantizedLinear)
    assert isinstance(q_model.body.embed_tokens, nn.QuantizedEmbedding)
    assert np.abs(quantized - dequantized).max() <= 1e-6, (quantized, dequantized)
    assert np.abs(logit(quantized) - logit(dequantized)).max() <= 5e-5
    # The round trip really is 4-bit: the weights moved off the float originals, and a 4-bit
    # model stays near them (loose: random tiny weights quantize worse than trained ones).
    original, _ = await scores_of(tiny_reranker_4b)
    assert not np.array_equal(dequantized, original)
    assert np.abs(dequantized - original).max() <= 0.1, (dequantized, original)


async def test_config_without_tie_word_embeddings_reads_as_untied(models_root, scores_of):
    """Hugging Face's Qwen3 default when the key is absent is an untied head."""
    path = build_reranker(models_root / "Qwen3-Reranker-no-tie-key", tied=False, seed=7)
    config = json.loads((path / "config.json").read_text())
    del config["tie_word_embeddings"]
    (path / "config.json").write_text(json.dumps(config))
    got, _ = await scores_of(path)
    ref = reranker_reference(path, QUERY, DOCS, TASK)
    assert np.abs(got - ref).max() <= 1e-4
