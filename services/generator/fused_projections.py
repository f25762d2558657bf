"""Merged projections: one matmul where mlx-lm's attention and MLP run two or three on the same input.

A decode step of a small model on a fast GPU is bound by the host: every operation MLX records
costs host time (docs/architecture.md, "Merged projections"), whatever its size. A Llama/Qwen layer
projects its input three times for the queries, keys and values and twice for the MLP's gate and
up; each set shares its input, so one matmul over the rows of the weights stacked gives the same
outputs (each output element is the same dot product) in one operation, and slices of it (views,
no copy) hand each projection its part. vLLM's ``QKVParallelLinear`` and
``MergedColumnParallelLinear`` do the same.

``merge_linears`` stacks the weights of layers of one kind (``nn.Linear``, or ``nn.QuantizedLinear``
of one bits / group size / mode: a quantized weight is packed along its input axis, so rows stack
as they do unquantized). The originals keep working: their weights become row slices of the stacked
ones (views of the same buffers), so merging costs no memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.activations import swiglu

# --merge-projections: "auto" merges when MLX computes on a GPU, where a small model's decode step
# waits on the host; on the CPU the arithmetic dominates, and "off" keeps the stock modules' bits.
MODES = ("auto", "on", "off")


def enabled(mode: str) -> bool:
    """Whether ``mode`` (one of MODES) merges the projections on this process's MLX device."""
    if mode not in MODES:
        raise ValueError(f"merge projections mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode == "on" or (mode == "auto" and mx.default_device() == mx.gpu)


# Parameters of a linear layer stacked along the output axis (rows); a quantized layer's weight
# is packed along its input axis, so its rows are still its outputs.
_ROW_PARAMS = ("weight", "scales", "biases", "bias")


class MergedLinear(nn.Module):
    """Several linear layers on one input as one: ``__call__(x)`` -> their outputs, in order
    (slices of one [..., sum(sizes)] product). sizes: each layer's output features."""

    def __init__(self, stacked: nn.Module, sizes: Sequence[int]):
        super().__init__()
        self.stacked = stacked
        self.sizes = list(sizes)
        self._cuts = [sum(self.sizes[: i + 1]) for i in range(len(self.sizes) - 1)]

    def __call__(self, x: mx.array) -> list[mx.array]:
        return mx.split(self.stacked(x), self._cuts, axis=-1)


def merge_linears(layers: Sequence[nn.Module]) -> MergedLinear | None:
    """One ``MergedLinear`` computing ``layers`` (applied to the same input), or None when they
    cannot stack: not all ``nn.Linear``, nor all ``nn.QuantizedLinear`` of one bits / group size /
    mode, or not all with (or all without) a bias. Rebinds each layer's parameters to row slices of
    the stacked ones (same values, shared buffers once evaluated)."""
    kind = type(layers[0])
    if kind not in (nn.Linear, nn.QuantizedLinear) or any(type(m) is not kind for m in layers):
        return None
    names = _row_params(layers[0])
    if any(_row_params(m) != names for m in layers):
        return None
    if any(m[p].dtype != layers[0][p].dtype or m[p].ndim != 2 - (p == "bias") for m in layers for p in names):
        return None
    if kind is nn.QuantizedLinear:
        quant = {(m.group_size, m.bits, m.mode) for m in layers}
        if len(quant) != 1:
            return None
        group_size, bits, mode = quant.pop()
        # Made without quantizing a placeholder (one row cannot be quantized in every mode, nvfp4's
        # for one), then given the stacked parameters.
        stacked = nn.QuantizedLinear.__new__(nn.QuantizedLinear)
        nn.Module.__init__(stacked)
        stacked.group_size, stacked.bits, stacked.mode = group_size, bits, mode
    else:
        stacked = nn.Linear(1, 1, bias="bias" in names)
    sizes = [m.weight.shape[0] for m in layers]
    for p in names:
        setattr(stacked, p, mx.concatenate([m[p] for m in layers], axis=0))
    if kind is nn.QuantizedLinear:
        stacked.freeze()
    mx.eval(stacked.parameters())
    start = 0
    for m, n in zip(layers, sizes):
        for p in names:
            setattr(m, p, stacked[p][start : start + n])
        start += n
    mx.eval([m.parameters() for m in layers])
    return MergedLinear(stacked, sizes)


def _row_params(layer: nn.Module) -> list[str]:
    return [p for p in _ROW_PARAMS if isinstance(layer.get(p), mx.array)]


class MergedMLP(nn.Module):
    """A Llama/Qwen MLP (``down_proj(silu(gate_proj(x)) * up_proj(x))``) with its gate and up
    projections as one matmul. inner: the stock module (its ``down_proj`` is used as is)."""

    def __init__(self, inner: nn.Module, gate_up: MergedLinear):
        super().__init__()
        self.inner = inner
        self.gate_up = gate_up

    def __call__(self, x: mx.array) -> mx.array:
        gate, up = self.gate_up(x)
        return self.inner.down_proj(swiglu(gate, up))


def merge_mlp(mlp: nn.Module) -> MergedMLP | None:
    """``mlp`` with its gate and up projections merged, or None when it is not a plain Llama/Qwen
    MLP (no gate_proj / up_proj / down_proj, a mixture of experts) or they cannot stack. The caller
    checks the outputs against the stock module's (``probe``)."""
    if not all(isinstance(getattr(mlp, p, None), nn.Module) for p in ("gate_proj", "up_proj", "down_proj")):
        return None
    gate_up = _try_merge([mlp.gate_proj, mlp.up_proj])
    return None if gate_up is None else MergedMLP(mlp, gate_up)


# The mlx-lm model types whose attention ``ExtendedMindAttention._stock`` reproduces and whose
# dense MLP is ``down_proj(swiglu(gate_proj(x), up_proj(x)))``; other types keep their modules
# (the check at load cannot tell a gelu MLP from a SiLU one within bfloat16's rounding).
MERGED_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mixtral"})


def merge(
    model: nn.Module, wrappers: Sequence[nn.Module], dtype, model_type: str, tokens: int = 5, seed: int = 0
) -> int:
    """Merges the projections of every layer of ``model`` whose merged form computes what the stock
    one does: the attention's (``wrappers``: the layers' ExtendedMindAttention, whose ``qkv`` is
    set) and the MLP's (``layer.mlp`` replaced by a ``MergedMLP``). Each is checked on a random
    input [1, tokens, hidden] of ``dtype`` against the stock module, within ``dtype``'s rounding (a
    matmul over more rows may sum in another order); one that differs, or cannot stack, is left
    as it is; a model type not in MERGED_TYPES is left whole. -> how many modules were merged.
    Runs on the MLX thread."""
    merged = 0
    if model_type not in MERGED_TYPES:
        return merged
    x = mx.random.normal((1, tokens, _hidden(model.layers[0])), key=mx.random.key(seed)).astype(dtype)
    for layer, w in zip(model.layers, wrappers):
        a = w.inner
        qkv = _try_merge([a.q_proj, a.k_proj, a.v_proj])
        d = qkv.sizes[0] // w.n_heads if qkv is not None else 0
        if qkv is not None and qkv.sizes == [w.n_heads * d, w.n_kv_heads * d, w.n_kv_heads * d]:
            w.qkv = qkv  # its heads are split off one [B, L, heads, d] view (ExtendedMindAttention._project)
            if _same(partial(w._stock, mask="causal", cache=None), partial(a, mask="causal", cache=None), x, dtype):
                merged += 1
            else:
                w.qkv = None
        mlp = merge_mlp(layer.mlp) if isinstance(layer.get("mlp"), nn.Module) else None
        if mlp is not None and _same(mlp, layer.mlp, x, dtype):
            layer.mlp = mlp
            merged += 1
    return merged


def _try_merge(layers: list) -> MergedLinear | None:
    """``merge_linears``, None when stacking raises (a quantization mode whose parameters do not
    stack): the layers then keep their own."""
    try:
        return merge_linears(layers)
    except (ValueError, TypeError, RuntimeError):
        return None


def _hidden(layer: nn.Module) -> int:
    norm = layer.input_layernorm.weight
    return norm.shape[-1]


def _same(ours, stock, x: mx.array, dtype) -> bool:
    """Whether ``ours(x)`` gives ``stock(x)`` within ``dtype``'s rounding (False when it raises what a
    module computing otherwise raises: shapes that do not fit)."""
    try:
        ours, stock = ours(x).astype(mx.float32), stock(x).astype(mx.float32)
        mx.eval(ours, stock)
    except (ValueError, TypeError, AttributeError):
        return False
    # Relative to the largest output: the merged matmul differs by its summation order only.
    tol = {mx.float32: 1e-4, mx.float16: 8e-3}.get(dtype, 3e-2)
    err = mx.max(mx.abs(ours - stock)).item()
    return err <= tol * mx.max(mx.abs(stock)).item()
