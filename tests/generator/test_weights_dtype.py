"""The dtype the generator computes in (services/generator/weights_dtype.py): a half-precision
checkpoint is widened to float32 on MLX's CPU build by default, kept with ``dtype="model"``, and
its memories and fingerprint follow the dtype it computes in."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.utils import load

from extmind import errors, tensor
from extmind.tiny_models import build_llama
from extmind.tiny_moe_models import build_qwen3_moe
from services.generator import weights_dtype
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.request_types import GenerationRequest, MemoryOptions, Sampling

from .helpers import run

# What the engine does on MLX's CPU build (where the suite runs by default); on a GPU build the
# engine keeps half precision, so these run only on the CPU.
cpu_only = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the engine's behaviour on MLX's CPU build")


@pytest.fixture(scope="module")
def half_path(tmp_path_factory):
    return build_llama(tmp_path_factory.mktemp("half"), hidden=64, layers=2, heads=4, kv_heads=2, dtype="float16")


def test_choose(half_path):
    model, _ = load(str(half_path))
    assert weights_dtype.choose(model, "auto", on_cpu=True) == mx.float32
    assert weights_dtype.choose(model, "auto", on_cpu=False) is None  # a GPU computes half precision fast
    assert weights_dtype.choose(model, "model", on_cpu=True) is None
    assert weights_dtype.choose(model, "float16", on_cpu=True) is None  # already
    assert weights_dtype.choose(model, "bfloat16", on_cpu=False) == mx.bfloat16
    # Norms kept in float32 (as some conversions do): still a half-precision model.
    model.model.norm.weight = model.model.norm.weight.astype(mx.float32)
    assert weights_dtype.choose(model, "auto", on_cpu=True) == mx.float32
    nn.quantize(model, group_size=32, bits=4)
    assert weights_dtype.choose(model, "auto", on_cpu=True) is None  # packed weights stay
    with pytest.raises(ValueError, match="quantized"):
        weights_dtype.choose(model, "float32", on_cpu=True)
    with pytest.raises(ValueError, match="use one of"):
        weights_dtype.choose(model, "float64", on_cpu=True)


@pytest.mark.parametrize("checkpoint", ["float16", "bfloat16"])
def test_half_precision_experts_are_float32_on_the_cpu(tmp_path, monkeypatch, checkpoint):
    # MLX's CPU build runs gather_mm (the experts) in float32 only: a half-precision MoE started
    # with --dtype model / float16 / bfloat16 failed every request with INTERNAL, and auto kept
    # half precision for a checkpoint over the float32 size cap.
    path = build_qwen3_moe(tmp_path, dtype=checkpoint)
    assert {v.dtype for v in mx.load(str(path / "model.safetensors")).values()} == {getattr(mx, checkpoint)}
    model, _ = load(str(path))
    for wanted in ("model", "float16", "bfloat16"):
        with pytest.raises(ValueError, match="gather_mm"):
            weights_dtype.choose(model, wanted, on_cpu=True)
    assert weights_dtype.choose(model, "model", on_cpu=False) is None  # a GPU runs them
    monkeypatch.setattr(weights_dtype, "AUTO_FLOAT32_MAX_BYTES", 0)
    assert weights_dtype.choose(model, "auto", on_cpu=True) == mx.float32


@cpu_only
@pytest.mark.parametrize("checkpoint", ["float16", "bfloat16"])
def test_an_engine_refuses_half_precision_experts_on_the_cpu(tmp_path, checkpoint):
    path = build_qwen3_moe(tmp_path, dtype=checkpoint)
    engine = GeneratorEngine(EngineConfig(model=str(path), dtype="float16"))
    try:
        with pytest.raises(errors.InvalidArgument, match="gather_mm"):
            engine.start()
    finally:
        engine.stop()


@cpu_only
async def test_a_half_precision_checkpoint_computes_and_memorizes_in_float32_on_the_cpu(
    half_path, module_memory_service
):
    engines = {
        d: GeneratorEngine(EngineConfig(model=str(half_path), memory_url=module_memory_service.address, dtype=d))
        for d in ("auto", "model")
    }
    try:
        for e in engines.values():
            e.start()
        wide, half = engines["auto"], engines["model"]
        assert (wide.dtype, half.dtype) == (tensor.FLOAT32, tensor.FLOAT16)
        assert wide.fingerprint != half.fingerprint  # memories of one are refused by the other
        prompt = GenerationRequest([5, 6, 7, 8], Sampling(max_tokens=6))
        assert len((await run(wide, prompt))[0]) > 0
        out = wide.memorize_blocking(list(range(5, 40)))
        assert wide.memory.get_memory(out["memory_id"]).layout.dtype == tensor.FLOAT32
        # The refusal says why: same checkpoint, another dtype (e.g. memories built before the
        # auto default widened it), and which --dtype would use them.
        same = "it is this model's memory, built in float32, and this generator computes in float16.*--dtype float32"
        with pytest.raises(errors.NotFound, match=same):
            await half.get_memory(out["memory_id"])  # what deleting or reading it through this generator says
        with pytest.raises(errors.FailedPrecondition, match=same):
            await run(
                half, GenerationRequest([5, 6], Sampling(max_tokens=2), memory=MemoryOptions((out["memory_id"],)))
            )
    finally:
        for e in engines.values():
            e.stop()


@cpu_only
async def test_another_models_memory_in_another_dtype_gets_no_dtype_hint(tmp_path, half_path, module_memory_service):
    # Another checkpoint of the same shape (other weights), computing in float32, memorizes; this
    # float16 generator must not suggest --dtype float32 for it (that would not make it usable).
    other = build_llama(tmp_path / "other", hidden=64, layers=2, heads=4, kv_heads=2, dtype="float16", seed=7)
    url = module_memory_service.address
    theirs = GeneratorEngine(EngineConfig(model=str(other), memory_url=url, dtype="auto"))
    ours = GeneratorEngine(EngineConfig(model=str(half_path), memory_url=url, dtype="model"))
    try:
        theirs.start()
        ours.start()
        assert (theirs.dtype, ours.dtype) == (tensor.FLOAT32, tensor.FLOAT16)
        mid = theirs.memorize_blocking(list(range(5, 30)))["memory_id"]
        with pytest.raises(errors.NotFound) as e:
            await ours.get_memory(mid)
        assert "--dtype" not in e.value.message and "built by another model" in e.value.message
        with pytest.raises(errors.FailedPrecondition) as e:
            await run(ours, GenerationRequest([5, 6], Sampling(max_tokens=2), memory=MemoryOptions((mid,))))
        assert "--dtype" not in e.value.message and e.value.message.endswith("memorize the text with this model")
    finally:
        theirs.stop()
        ours.stop()
