"""4-bit and 8-bit checkpoints made by mlx-lm's own quantization (group size 64, as in the
mlx-community repos), loaded through the same path as a downloaded model.

The generator derives every shape from the config, never from weight shapes: a packed 4-bit
o_proj of a 128-wide model is [128, 16] uint32, and reading head_dim from it once stored
memories of the wrong layout (head_dim 4 for 32)."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import convert
from mlx_lm.generate import generate_step
from mlx_lm.utils import load

from extmind import tensor
from extmind.tiny_models import build_llama
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.memory_client import MemoryClient
from services.generator.request_types import GenerationRequest, MemoryOptions, Sampling

from .helpers import run

TEXT = "Paris is the capital of France. Alice met Bob at the station at noon, and they talked about trains."


@pytest.fixture(scope="module", params=[4, 8])
def quantized_path(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"q{request.param}")
    src = build_llama(d / "float", hidden=128, layers=2, heads=4, kv_heads=2, seed=3)
    out = d / f"llama-{request.param}bit"
    convert(hf_path=str(src), mlx_path=str(out), quantize=True, q_bits=request.param, q_group_size=64)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization"]["bits"] == request.param and cfg["quantization"]["group_size"] == 64
    return out


@pytest.fixture(scope="module")
def engine(quantized_path, module_memory_service):
    e = GeneratorEngine(EngineConfig(model=str(quantized_path), memory_url=module_memory_service.address))
    e.start()
    yield e
    e.stop()


def test_shapes_come_from_the_config(engine, quantized_path):
    model, _ = load(str(quantized_path))
    packed = model.layers[0].self_attn.o_proj.weight
    assert packed.dtype.size == 4 and packed.shape[1] < 128  # really packed: shapes cannot be read off it
    assert (engine.num_layers, engine.num_heads, engine.num_kv_heads, engine.head_dim) == (2, 4, 2, 32)


async def test_memorize_stores_the_config_layout(engine, module_memory_service):
    tokens = engine.tokenizer.encode(TEXT)
    out = engine.memorize_blocking(tokens)
    client = MemoryClient(module_memory_service.address)
    try:
        mem = client.get_memory(out["memory_id"])
        assert (mem.layout.num_layers, mem.layout.num_kv_heads, mem.layout.head_dim) == (2, 2, 32)
        assert mem.layout.dtype == engine.dtype == tensor.FLOAT32  # the model computes in float32
        keys, _ = client.fetch(out["memory_id"], engine.num_layers)
        assert keys[0].shape == (2, len(tokens) - 1, 32) and out["num_rows"] == len(tokens) - 1
    finally:
        client.close()


async def test_no_memory_equals_stock_and_local_equals_remote(engine, quantized_path):
    prompt = engine.tokenizer.encode("Alice met Bob at the station and they talked about")
    model, tok = load(str(quantized_path))
    stock = []
    for t, _ in generate_step(mx.array(prompt), model, max_tokens=8):  # stock mlx-lm, stopping at EOS
        if t in tok.eos_token_ids:
            break
        stock.append(int(t))
    got, _, _, _ = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=8)))
    assert stock and got == stock
    mid = engine.memorize_blocking(engine.tokenizer.encode(TEXT))["memory_id"]
    out = {}
    for mode in ("local", "remote"):
        out[mode] = await run(
            engine,
            GenerationRequest(
                prompt, Sampling(max_tokens=8), MemoryOptions((mid,), top_k=4, mode=mode), return_logprobs=True
            ),
        )
    assert out["local"][0] == out["remote"][0]
    np.testing.assert_allclose(out["local"][1], out["remote"][1], atol=1e-4)
