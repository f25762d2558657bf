"""KV rows between MLX and the wire, in the dtype they are stored in (docs/extended-mind.md,
"Dtypes").

A memory's rows travel and sit in Redis in the memory's dtype (``extmind.tensor`` codes float32,
float16, bfloat16; Memorize writes the model's compute dtype). numpy has no bfloat16, so on the
numpy side bfloat16 rows are their raw uint16 bits (``extmind.tensor.STORAGE``); on the MLX side
they are reinterpreted with ``view``, never widened or rounded.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from extmind import tensor

MX_DTYPES = {tensor.FLOAT32: mx.float32, tensor.FLOAT16: mx.float16, tensor.BFLOAT16: mx.bfloat16}
KV_DTYPES = tuple(MX_DTYPES)


def dtype_of(dtype: mx.Dtype) -> int:
    """The ``extmind.tensor`` code of a floating MLX dtype. Raises ValueError for others."""
    for code, d in MX_DTYPES.items():
        if d == dtype:
            return code
    raise ValueError(f"no KV dtype for {dtype}: keys and values are float32, float16 or bfloat16")


def to_storage(a: mx.array, dtype: int) -> mx.array:
    """``a`` cast to ``dtype`` (a no-op when it already is), bfloat16 viewed as its uint16 bits:
    ``np.array`` of the result (once evaluated) is the storage array ``tensor.encode`` sends as is."""
    a = a.astype(MX_DTYPES[dtype])
    return a.view(mx.uint16) if dtype == tensor.BFLOAT16 else a


def from_storage(a: np.ndarray, dtype: int) -> mx.array:
    """A numpy storage array of ``dtype`` (bfloat16 as uint16 bits) -> an MLX array of that dtype,
    bit for bit."""
    if dtype == tensor.BFLOAT16:
        return mx.array(np.ascontiguousarray(a, dtype="<u2")).view(mx.bfloat16)
    return mx.array(np.ascontiguousarray(a, dtype=tensor.STORAGE[dtype]))


def widen(a: np.ndarray, dtype: int) -> np.ndarray:
    """A numpy storage array of ``dtype`` -> float32, exactly (every float16 and bfloat16 is a float32)."""
    return tensor.bf16_bits_to_float32(a) if dtype == tensor.BFLOAT16 else a.astype(np.float32, copy=False)
