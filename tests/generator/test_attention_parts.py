"""Which mlx-lm models extended mind accepts: the tested table, any other type whose attention has
the Llama/Qwen parts and computes like them, and a clear refusal naming what is missing otherwise
(random-weight mlx-lm modules, built from a config without any checkpoint)."""

from __future__ import annotations

import importlib

import mlx.core as mx
import pytest
from mlx_lm import convert
from mlx_lm.utils import load

from extmind.tiny_moe_models import DECODER_BUILDERS
from services.generator.attention_parts import TESTED_MODEL_TYPES, UnsupportedModel, attention_shape, compute_dtype
from services.generator.extended_attention import install

from .helpers import QUANTIZED_SIZES, RANDOM_MODEL_ARGS, random_model


@pytest.mark.parametrize("model_type", ["smollm3", "starcoder2", "internlm3", "seed_oss"])
def test_an_untested_type_with_the_same_attention_is_accepted(model_type):
    state = install(random_model(model_type))
    assert model_type not in TESTED_MODEL_TYPES
    assert (state.shape.num_layers, state.shape.num_kv_heads, state.shape.head_dim) == (2, 2, 16)
    assert len(state.modules) == 2


def test_a_nested_text_config_gives_the_shape():
    """Multimodal checkpoints (Mistral 3 here) keep the decoder's config under text_config."""
    config = dict(model_type="mistral3", text_config=dict(RANDOM_MODEL_ARGS, model_type="llama", head_dim=None))
    module = importlib.import_module("mlx_lm.models.mistral3")
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    state = install(model, config)
    assert (state.shape.model_type, state.shape.num_kv_heads, state.shape.head_dim) == ("mistral3", 2, 16)


@pytest.mark.parametrize(
    "model_type,names",
    [
        ("phi3", "has no q_proj, k_proj, v_proj"),  # one fused qkv_proj
        ("gpt_oss", "has no scale"),
        ("gemma2", "has attn_logit_softcapping"),  # soft-capped logits
        ("olmo2", "does not project like Llama/Qwen"),  # q/k norms over all heads at once
        ("hunyuan_v1_dense", "is not the Llama/Qwen computation"),  # q/k norms after RoPE
    ],
)
def test_other_attentions_are_refused_naming_what_is_missing(model_type, names):
    with pytest.raises(UnsupportedModel, match=f"model type '{model_type}'.*{names}"):
        install(random_model(model_type))


def test_shapes_follow_how_mlx_lm_sizes_a_head():
    # Qwen2, Qwen2-MoE and Mixtral ignore a config head_dim (hidden / heads); the others honour it.
    for model_type, rule in TESTED_MODEL_TYPES.items():
        shape = attention_shape(dict(RANDOM_MODEL_ARGS, model_type=model_type, head_dim=32))
        assert shape.head_dim == (16 if rule == "split" else 32)
    shape = attention_shape(dict(RANDOM_MODEL_ARGS, model_type="llama", head_dim=None, num_key_value_heads=None))
    assert (shape.head_dim, shape.num_kv_heads) == (16, 4)
    with pytest.raises(UnsupportedModel, match="no hidden_size"):
        attention_shape(dict(RANDOM_MODEL_ARGS, model_type="llama", hidden_size=None))


@pytest.mark.parametrize("model_type", list(DECODER_BUILDERS))
def test_bfloat16_4bit_checkpoints_pass_the_load_probe(model_type, tmp_path):
    """The seed models compute in bfloat16: the probe allows the stock module's rounding there, and
    the wrapped model without memories still gives the stock logits exactly."""
    src = DECODER_BUILDERS[model_type](tmp_path / "float", seed=4, **QUANTIZED_SIZES[model_type])
    out = tmp_path / "bf16-4bit"
    convert(hf_path=str(src), mlx_path=str(out), quantize=True, q_bits=4, q_group_size=64, dtype="bfloat16")
    model, _, cfg = load(str(out), return_config=True)
    tokens = mx.array([[1, 2, 3, 4, 5, 6]])
    stock = model(tokens)
    state = install(model, cfg)
    assert compute_dtype(model) == mx.bfloat16 and state.shape.model_type == model_type
    assert mx.array_equal(model(tokens), stock).item()
