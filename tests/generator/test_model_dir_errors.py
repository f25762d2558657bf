"""A generator model directory that is not one (a natural mistake: GENERATOR_MODEL=./models, the
folder above the model) fails at start with one message naming what is missing, not mlx-lm's
bare FileNotFoundError."""

from __future__ import annotations

import pytest

from extmind import errors
from extmind.tiny_models import build_llama
from services.generator.engine import EngineConfig, GeneratorEngine


def _start(model_dir) -> str:
    engine = GeneratorEngine(EngineConfig(model=str(model_dir)))
    with pytest.raises(errors.NotFound) as got:
        engine.start()
    return got.value.message


def test_a_folder_holding_a_model_is_not_the_model(tmp_path):
    build_llama(tmp_path / "llama", hidden=32, layers=1, heads=2, kv_heads=1, seed=0)
    assert _start(tmp_path) == (
        f"generator model {str(tmp_path)!r}: {tmp_path.resolve()} has no config.json and no model*.safetensors; "
        "pass a model directory with config.json, model*.safetensors and tokenizer files (such as "
        "models/extmind-facts-6m), or a hub id"
    )


def test_a_model_without_weights_names_them(tmp_path):
    model = build_llama(tmp_path / "llama", hidden=32, layers=1, heads=2, kv_heads=1, seed=0)
    for weights in model.glob("model*.safetensors"):
        weights.unlink()
    assert f"{model.resolve()} has no model*.safetensors; pass a model directory" in _start(model)
