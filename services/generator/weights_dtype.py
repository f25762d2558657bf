"""The dtype the generator computes in (docs/platform.md, "Half precision on the CPU").

MLX's CPU build has no fast float16 / bfloat16 matmul (~4.5 GFLOP/s on 2 cores against ~200 for
float32 with OpenBLAS): a half-precision checkpoint served on the CPU as it is prefills the
committed 6M model's 2 048 tokens in ~20 s instead of ~4 s. So by default (``auto``) a float16 /
bfloat16 checkpoint is widened to float32 when MLX computes on the CPU, unless it is quantized or
its float32 weights would exceed ``AUTO_FLOAT32_MAX_BYTES``. Memories are built and stored in
the dtype the model computes in, and the model fingerprint names it, so memories built in one
dtype are not used by a generator computing in another.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models.switch_layers import SwitchLinear

CHOICES = ("auto", "model", "float32", "float16", "bfloat16")
AUTO_FLOAT32_MAX_BYTES = 8 << 30


def _quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for m in model.modules())


def _float_experts(model: nn.Module) -> bool:
    """Whether ``model`` has unquantized mixture-of-experts layers: they run through
    ``mx.gather_mm``, which MLX's CPU build computes in float32 only."""
    return any(isinstance(m, SwitchLinear) for m in model.modules())


def choose(model: nn.Module, wanted: str, on_cpu: bool) -> mx.Dtype | None:
    """The dtype to cast ``model``'s floating-point weights to, or None to keep them.

    ``wanted``: one of CHOICES ("model" keeps the checkpoint's). Raises ValueError for a
    float dtype asked of a quantized model (its packed weights cannot change dtype), and for a
    half-precision mixture-of-experts model on the CPU (every request would fail in gather_mm)."""
    if wanted not in CHOICES:
        raise ValueError(f"dtype {wanted!r}: use one of {', '.join(CHOICES)}")
    params = [a for _, a in tree_flatten(model.parameters()) if mx.issubdtype(a.dtype, mx.floating)]
    current = {a.dtype for a in params}
    experts_on_cpu = on_cpu and _float_experts(model)
    if wanted in ("model", "float16", "bfloat16") and experts_on_cpu:
        kept = current if wanted == "model" else {getattr(mx, wanted)}
        if kept != {mx.float32}:
            raise ValueError(
                f"dtype {wanted!r} leaves this mixture-of-experts model in half precision, and MLX's CPU "
                "build computes its experts (gather_mm) in float32 only: use 'auto' or 'float32'"
            )
    if wanted == "model":
        return None
    if wanted != "auto":
        if _quantized(model):
            raise ValueError(f"dtype {wanted!r} cannot apply to a quantized model: use 'model' (or 'auto')")
        target = getattr(mx, wanted)
        return None if current == {target} else target
    # Any half-precision weight, not only all of them: a checkpoint that keeps its norms or
    # router in float32 still runs its big matmuls (and experts) in half precision.
    if not on_cpu or _quantized(model) or not current & {mx.float16, mx.bfloat16}:
        return None
    # Float32 experts on the CPU whatever their size: in half precision they cannot run at all.
    fits = sum(a.size for a in params) * 4 <= AUTO_FLOAT32_MAX_BYTES
    return mx.float32 if fits or experts_on_cpu else None


def cast(model: nn.Module, dtype: mx.Dtype) -> None:
    """Casts every floating-point weight of ``model`` to ``dtype`` in place."""
    model.update(tree_map(lambda a: a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a, model.parameters()))
    mx.eval(model.parameters())
