"""Which mlx-lm models extended mind can drive, and the attention shape it derives from the config.

Extended mind (docs/extended-mind.md) re-computes a layer's attention from the stock module's own
parts: ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``rope``, ``scale`` and, in the Qwen3
family, per-head ``q_norm``/``k_norm`` applied before RoPE. Mixture-of-experts models (Qwen2-MoE,
Qwen3-MoE, Mixtral) keep the experts in the MLP; their attention is the same.

A model is accepted when

- its type is in ``TESTED_MODEL_TYPES`` (the table: run against the numpy reference in the tests,
  quantized and not), or any other mlx-lm type whose every ``layer.self_attn`` has those parts and
  no part known to change the computation (``sinks``, logit soft-capping);
- and, for every type, a probe at install passes: each wrapped layer, attending to no memory,
  reproduces the stock module's output on a few random tokens (``probe``). A re-implementation
  that would silently differ from the stock attention is refused at load, not at the first answer.

Every shape comes from the config, never from weight shapes: a quantized weight is packed (a
4-bit ``o_proj`` of a 128-wide model is ``[128, 16]`` uint32). The probe's activations (never
packed) cross-check ``head_dim``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import mlx.nn as nn

log = logging.getLogger("extmind.generator")

# model type -> how mlx-lm's attention of that type sizes a head: "config" (the config's
# head_dim, else hidden_size / heads) or "split" (always hidden_size / heads, a config head_dim is
# ignored by mlx-lm). "mistral" is mlx-lm's llama module.
TESTED_MODEL_TYPES = {
    "llama": "config",
    "mistral": "config",
    "qwen2": "split",
    "qwen3": "config",
    "qwen2_moe": "split",
    "qwen3_moe": "config",
    "mixtral": "split",
}
REQUIRED_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "rope", "scale")
# Attention parts that change what the attention computes in ways the wrapper does not reproduce.
UNSUPPORTED_PARTS = ("sinks", "attn_logit_softcapping", "logit_softcapping", "softcap")


class UnsupportedModel(ValueError):
    """The model's attention is not one extended mind can drive; the message names what is missing."""


@dataclass(frozen=True)
class AttentionShape:
    """The attention shape of a model, from its config: every layer has ``num_heads`` query heads
    over ``num_kv_heads`` KV heads of ``head_dim``; a memory row of one layer is
    ``num_kv_heads x head_dim`` keys plus as many values."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int


def _config_dict(model: nn.Module, config: dict | None) -> dict:
    if config is not None:
        return dict(config)
    args = getattr(model, "args", None)
    if args is None:
        raise UnsupportedModel("the model has no config (model.args) to read its attention shape from")
    return dict(vars(args))


def attention_shape(config: dict) -> AttentionShape:
    """The attention shape from a model's ``config.json`` (dict; a nested ``text_config`` when the
    top level has no attention keys), as mlx-lm's attention sizes it. Raises UnsupportedModel
    when a needed key is missing."""
    model_type = config.get("model_type")
    text = config.get("text_config")
    if isinstance(text, dict) and not config.get("num_attention_heads"):
        # A multimodal checkpoint (Mistral 3, Qwen3-VL, ...): its decoder's config is nested.
        inner = attention_shape({**text, "model_type": text.get("model_type") or model_type})
        return replace(inner, model_type=str(model_type))
    missing = [k for k in ("num_hidden_layers", "num_attention_heads", "hidden_size") if not config.get(k)]
    if missing:
        raise UnsupportedModel(f"model type {model_type!r}: the config has no {', '.join(missing)}")
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    rule = TESTED_MODEL_TYPES.get(model_type, "config")
    head_dim = hidden // heads if rule == "split" else int(config.get("head_dim") or hidden // heads)
    return AttentionShape(str(model_type), int(config["num_hidden_layers"]), heads, kv_heads, head_dim, hidden)


def check_structure(model: nn.Module, model_type: str) -> None:
    """Raises UnsupportedModel naming the first part extended mind needs that ``model`` lacks."""
    tested = ", ".join(TESTED_MODEL_TYPES)
    layers = getattr(model, "layers", None)
    if not layers:
        raise UnsupportedModel(
            f"model type {model_type!r} has no decoder layers (model.layers); extended mind is tested on {tested}"
        )
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise UnsupportedModel(
                f"model type {model_type!r}: layer {i} has no self_attn module; extended mind needs a "
                f"Llama/Qwen-style attention (tested: {tested})"
            )
        missing = [p for p in REQUIRED_PARTS if not _has(attn, p)]
        if missing:
            raise UnsupportedModel(
                f"model type {model_type!r}: the attention of layer {i} ({type(attn).__name__}) has no "
                f"{', '.join(missing)}; extended mind needs q_proj, k_proj, v_proj, o_proj, rope and scale "
                f"as in Llama/Qwen (tested: {tested})"
            )
        extra = [p for p in UNSUPPORTED_PARTS if _has(attn, p)]
        if extra:
            raise UnsupportedModel(
                f"model type {model_type!r}: the attention of layer {i} ({type(attn).__name__}) has "
                f"{', '.join(extra)}, which extended mind does not reproduce (tested: {tested})"
            )


def _has(module: Any, name: str) -> bool:
    return getattr(module, name, None) is not None


def resolve(model: nn.Module, config: dict | None = None) -> AttentionShape:
    """Checks that extended mind can drive ``model`` and returns its attention shape.
    ``config``: the model's config.json (default: the model's own ``args``). Raises
    UnsupportedModel naming what is missing."""
    cfg = _config_dict(model, config)
    model_type = cfg.get("model_type") or getattr(model, "model_type", None)
    cfg["model_type"] = model_type
    check_structure(model, model_type)
    shape = attention_shape(cfg)
    if shape.num_layers != len(model.layers):
        raise UnsupportedModel(
            f"model type {model_type!r}: the config has {shape.num_layers} layers, the model {len(model.layers)}"
        )
    if shape.num_heads % shape.num_kv_heads:
        raise UnsupportedModel(
            f"model type {model_type!r}: {shape.num_heads} query heads are not a multiple of "
            f"{shape.num_kv_heads} KV heads"
        )
    if model_type not in TESTED_MODEL_TYPES:
        log.warning(
            "extended mind on an untested model type: its attention has the Llama/Qwen parts",
            extra={"model_type": model_type},
        )
    return shape


def compute_dtype(model: nn.Module):
    """The dtype the model computes in: that of its first layer's norm weights (never quantized;
    a quantized projection's weight is uint32), else of its first floating-point parameter."""
    from mlx.utils import tree_flatten

    params = tree_flatten(model.layers[0].parameters())
    floats = [(name, a.dtype) for name, a in params if mx.issubdtype(a.dtype, mx.floating)]
    norms = [dt for name, dt in floats if name.endswith("norm.weight")]
    if norms or floats:
        return (norms or [dt for _, dt in floats])[0]
    return mx.float32


class _NoMemories:
    """A retriever whose every memory is masked: the wrapper then computes plain attention."""

    rows = 1

    def retrieve(self, layer, queries, top_k, threshold):
        from services.generator.extended_attention import Retrieved

        B, kvh, rep, L, d = queries.shape
        return Retrieved(
            dots=mx.zeros((B, kvh, rep, L, 1), mx.float32),
            valid=mx.zeros((B, kvh, rep, L, 1), mx.bool_),
            values=mx.zeros((B, kvh, rep, L, 1, d), mx.float32),
            indices=mx.full((B, kvh, rep, L, 1), -1, mx.int32),
        )


def probe(wrappers, shape: AttentionShape, dtype, tokens: int = 5, seed: int = 0) -> None:
    """Runs every wrapped layer with no memory through the wrapper's own attention and through the
    stock module on the same random input [1, tokens, hidden] (``dtype``); raises UnsupportedModel
    when a layer's keys do not have ``shape.head_dim`` or the outputs differ beyond the rounding
    of ``dtype``. Runs on the MLX thread."""
    from services.generator.extended_attention import MemoryContext

    ctx = MemoryContext(_NoMemories(), top_k=1)
    x = (mx.random.normal((1, tokens, shape.hidden_size), key=mx.random.key(seed))).astype(dtype)
    # The wrapper softmaxes in float32, the stock module in the model dtype: allow its rounding
    # (tiny models show ~1 bfloat16 ulp, 0.008 of the largest output; a structural difference,
    # a missed norm or scale, is of the order of the output itself).
    tol = {mx.float32: 1e-4, mx.float16: 2e-2}.get(dtype, 1e-1)
    for w in wrappers:
        try:
            _, k, _ = w._project(x)
            stock = w.inner(x, "causal", None).astype(mx.float32)
            ours = w._with_memories(x, "causal", None, ctx).astype(mx.float32)
            mx.eval(k, stock, ours)
        except (ValueError, TypeError, AttributeError) as exc:
            raise UnsupportedModel(
                f"model type {shape.model_type!r}: layer {w.layer}'s attention ({type(w.inner).__name__}) does not "
                f"project like Llama/Qwen, which extended mind needs ({type(exc).__name__}: {exc})"
            ) from exc
        if k.shape[-1] != shape.head_dim or k.shape[1] != shape.num_kv_heads:
            raise UnsupportedModel(
                f"model type {shape.model_type!r}: layer {w.layer} computes keys of {k.shape[1]} heads x "
                f"{k.shape[-1]}; the config gives {shape.num_kv_heads} x {shape.head_dim}"
            )
        err = mx.max(mx.abs(stock - ours)).item()
        bound = tol * max(1.0, mx.max(mx.abs(stock)).item())
        if not err <= bound:
            raise UnsupportedModel(
                f"model type {shape.model_type!r}: layer {w.layer}'s attention ({type(w.inner).__name__}) is not "
                f"the Llama/Qwen computation extended mind reproduces (output differs by {err:.3g} > {bound:.3g})"
            )
