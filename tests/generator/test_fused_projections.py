"""Merged projections (services/generator/fused_projections.py): q/k/v and gate/up as one matmul
each give what the separate projections give, on float and quantized layers, on every tested
model type; layers that cannot stack, or whose merged form would compute something else, keep
their own; merging costs no memory."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.utils import load

from extmind.tiny_models import build_llama
from extmind.tiny_moe_models import DECODER_BUILDERS
from services.generator.extended_attention import install
from services.generator.fused_projections import MergedMLP, merge_linears

from .helpers import random_model

# Summed over the same inputs in another order at most: float32 rounding of 64-term dot products.
TOL = dict(rtol=1e-5, atol=1e-5)


def _linears(kind: str, bias: bool, sizes=(48, 16, 16), dims=64):
    mx.random.seed(0)
    layers = [nn.Linear(dims, n, bias=bias) for n in sizes]
    if kind != "float":
        bits = int(kind)
        layers = [nn.QuantizedLinear.from_linear(m, group_size=32, bits=bits) for m in layers]
    mx.eval([m.parameters() for m in layers])
    return layers


@pytest.mark.parametrize("kind", ["float", "4", "8"])
@pytest.mark.parametrize("bias", [False, True])
def test_a_merged_linear_gives_each_layers_output(kind, bias):
    layers = _linears(kind, bias)
    x = mx.random.normal((2, 3, 64), key=mx.random.key(1))
    want = [np.array(m(x)) for m in layers]
    merged = merge_linears(layers)
    assert merged is not None and merged.sizes == [48, 16, 16]
    got = merged(x)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.array(g), w, **TOL)
    for m, w in zip(layers, want):  # the originals still compute what they did (their rows of the stack)
        np.testing.assert_allclose(np.array(m(x)), w, **TOL)


def test_layers_that_cannot_stack_are_left_alone():
    float_, four, eight = _linears("float", False), _linears("4", False), _linears("8", False)
    assert merge_linears([float_[0], four[1]]) is None  # float with quantized
    assert merge_linears([four[0], eight[1]]) is None  # other bits
    assert merge_linears([float_[0], _linears("float", True)[1]]) is None  # bias on one only
    mixed = [float_[0], nn.Linear(64, 16, bias=False)]
    mixed[1].weight = mixed[1].weight.astype(mx.float16)
    assert merge_linears(mixed) is None  # other dtypes


@pytest.mark.parametrize("model_type", list(DECODER_BUILDERS))
def test_every_tested_model_type_keeps_its_logits(model_type, tmp_path):
    """The wrapped model with merged projections against the same checkpoint wrapped without: the
    logits of a prompt and of decode steps on a KV cache agree to float32 rounding."""
    path = DECODER_BUILDERS[model_type](tmp_path / "m", seed=2)
    plain, merged = load(str(path))[0], load(str(path))[0]
    install(plain, merge=False)
    state = install(merged, merge=True)
    assert all(w.qkv is not None for w in state.modules)
    dense = [layer for layer in merged.layers if hasattr(getattr(layer, "mlp", None), "inner")]
    if model_type in ("llama", "qwen2", "qwen3"):
        assert len(dense) == len(merged.layers) and all(isinstance(m.mlp, MergedMLP) for m in dense)
    from mlx_lm.models.cache import make_prompt_cache

    caches = make_prompt_cache(plain), make_prompt_cache(merged)
    tokens = mx.array([[5, 9, 2, 7, 1, 3]])
    for step in range(4):
        a, b = plain(tokens, cache=caches[0]), merged(tokens, cache=caches[1])
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-4, atol=1e-4)
        tokens = mx.array([[11 + step]])


class _GeluMLP(nn.Module):
    """Has the gate/up/down parts of a Llama MLP but another activation: merging it would change it."""

    def __init__(self, mlp):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj

    def __call__(self, x):
        return self.down_proj(nn.gelu(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_a_layer_whose_merged_form_differs_keeps_its_own(tmp_path, dtype):
    """Also in bfloat16, whose rounding is coarse: the check is relative to the outputs' size."""
    model = load(str(build_llama(tmp_path / "m", seed=3)))[0]
    model.set_dtype(dtype)
    model.layers[1].mlp = _GeluMLP(model.layers[1].mlp)
    install(model, merge=True)
    assert isinstance(model.layers[0].mlp, MergedMLP)
    assert isinstance(model.layers[1].mlp, _GeluMLP)


def test_merge_off_keeps_the_stock_modules(tmp_path):
    model = load(str(build_llama(tmp_path / "m", seed=3)))[0]
    state = install(model, merge=False)
    assert all(w.qkv is None for w in state.modules)
    assert not any(isinstance(layer.mlp, MergedMLP) for layer in model.layers)


def test_merging_costs_no_memory(tmp_path):
    """The originals' weights become views of the stacked ones: the weights are held once."""
    path = build_llama(tmp_path / "m", hidden=256, layers=4, heads=4, kv_heads=2, intermediate=1024, seed=1)
    model = load(str(path))[0]
    weights = sum(v.nbytes for layer in model.layers for _, v in nn.utils.tree_flatten(layer.parameters()))
    mx.clear_cache()
    before = mx.get_active_memory()
    install(model, merge=True)
    mx.clear_cache()
    assert mx.get_active_memory() - before < 0.1 * weights, (mx.get_active_memory() - before, weights)


def test_auto_merges_on_a_gpu_only():
    from services.generator.fused_projections import enabled

    assert enabled("auto") == (mx.default_device() == mx.gpu)
    assert enabled("on") and not enabled("off")
    with pytest.raises(ValueError, match="auto, on, off"):
        enabled("yes")


def test_untested_model_types_keep_their_modules():
    """Gemma's MLP has the gate/up/down parts but a gelu: types outside MERGED_TYPES are not merged."""
    model = random_model("gemma")
    model.set_dtype(mx.bfloat16)
    mx.eval(model.parameters())
    state = install(model, merge=True)
    assert state.merged_projections == 0 and all(w.qkv is None for w in state.modules)


def test_nvfp4_layers_merge_or_stay_without_an_error():
    layers = _linears("float", False)
    quant = [nn.QuantizedLinear.from_linear(m, group_size=16, bits=4, mode="nvfp4") for m in layers]
    x = mx.random.normal((2, 3, 64), key=mx.random.key(1))
    want = [np.array(m(x)) for m in quant]
    merged = merge_linears(quant)
    if merged is not None:
        for g, w in zip(merged(x), want):
            np.testing.assert_allclose(np.array(g), w, **TOL)
