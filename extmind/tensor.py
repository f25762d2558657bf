"""The ``Tensor`` <-> numpy codec (row-major, little-endian, no padding).

bfloat16 has no numpy dtype: ``decode`` widens it to float32 exactly (bf16 is the upper half of
a float32); ``decode_raw`` returns the raw uint16 bits without a copy. ``encode`` rounds float32
to bfloat16 with round-to-nearest-even, or takes a uint16 array of raw bf16 bits as is.
"""

from __future__ import annotations

import math

import numpy as np

from extmind.errors import InvalidArgument
from extmind.v1 import common_pb2

DType = common_pb2.DType
FLOAT32, FLOAT16, BFLOAT16 = common_pb2.DTYPE_FLOAT32, common_pb2.DTYPE_FLOAT16, common_pb2.DTYPE_BFLOAT16
INT32, INT64 = common_pb2.DTYPE_INT32, common_pb2.DTYPE_INT64

# Storage dtype of each wire dtype (bf16 is stored as its raw uint16 bits).
STORAGE = {
    FLOAT32: np.dtype("<f4"),
    FLOAT16: np.dtype("<f2"),
    BFLOAT16: np.dtype("<u2"),
    INT32: np.dtype("<i4"),
    INT64: np.dtype("<i8"),
}
ITEMSIZE = {k: v.itemsize for k, v in STORAGE.items()}
_FROM_NUMPY = {
    np.dtype("float32"): FLOAT32,
    np.dtype("float16"): FLOAT16,
    np.dtype("int32"): INT32,
    np.dtype("int64"): INT64,
}


def dtype_name(dtype: int) -> str:
    try:
        return common_pb2.DType.Name(dtype)
    except ValueError:
        return f"DType({dtype})"


def float32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even), returned as uint16 bits. NaN stays NaN."""
    bits = np.ascontiguousarray(a, dtype="<f4").view("<u4")
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    nan = np.isnan(a)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype("<u2")
    return rounded


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype("<u4") << 16).view("<f4")


def encode(array, dtype: int | None = None) -> common_pb2.Tensor:
    """numpy array -> Tensor. ``dtype`` None infers it from the array."""
    a = np.asarray(array)
    if dtype is None:
        if a.dtype not in _FROM_NUMPY:
            raise TypeError(f"cannot encode numpy dtype {a.dtype}; pass dtype= explicitly")
        dtype = _FROM_NUMPY[a.dtype]
    if dtype == BFLOAT16:
        data = a.astype("<u2", copy=False) if a.dtype == np.uint16 else float32_to_bf16_bits(a)
    elif dtype in STORAGE:
        data = a.astype(STORAGE[dtype], copy=False)
    else:
        raise TypeError(f"cannot encode to {dtype_name(dtype)}")
    # tobytes writes row-major order itself: one copy, also for a strided view (a slice of rows)
    return common_pb2.Tensor(dtype=dtype, shape=list(a.shape), data=data.tobytes())


def _check(t: common_pb2.Tensor, name: str, dtypes, shape, ndim) -> np.dtype:
    if t is None or (t.dtype == 0 and not t.shape and not t.data):
        raise InvalidArgument(f"{name} is missing: send a Tensor with dtype, shape and data")
    if t.dtype not in STORAGE:
        raise InvalidArgument(
            f"{name}.dtype {dtype_name(t.dtype)} is not a valid dtype; use one of "
            + ", ".join(dtype_name(d) for d in STORAGE)
        )
    if dtypes is not None and t.dtype not in dtypes:
        raise InvalidArgument(
            f"{name}.dtype is {dtype_name(t.dtype)}; expected " + " or ".join(dtype_name(d) for d in dtypes)
        )
    dims = list(t.shape)
    if any(d < 0 for d in dims):
        raise InvalidArgument(f"{name}.shape {dims} has a negative dimension")
    if ndim is not None and len(dims) != ndim:
        raise InvalidArgument(f"{name}.shape {dims} must have {ndim} dimensions")
    if shape is not None:
        for i, (got, want) in enumerate(zip(dims, shape)):
            if want is not None and got != want:
                raise InvalidArgument(f"{name}.shape {dims}: dimension {i} must be {want}, got {got}")
    n = math.prod(dims)  # exact: an int64 product of huge dimensions can wrap to the data's length
    want_bytes = n * ITEMSIZE[t.dtype]
    if len(t.data) != want_bytes:
        raise InvalidArgument(
            f"{name}.data has {len(t.data)} bytes but shape {dims} of {dtype_name(t.dtype)} needs {want_bytes}"
        )
    return STORAGE[t.dtype]


def decode_raw(t: common_pb2.Tensor, *, name: str = "tensor", dtypes=None, shape=None, ndim=None) -> np.ndarray:
    """Tensor -> read-only numpy view of the bytes (bf16 as uint16 bits). Validates strictly.

    ``shape`` may hold None for free dimensions; ``ndim`` fixes the rank.
    """
    if shape is not None and ndim is None:
        ndim = len(shape)
    storage = _check(t, name, dtypes, shape, ndim)
    return np.frombuffer(t.data, dtype=storage).reshape(tuple(t.shape))


def decode(t: common_pb2.Tensor, *, name: str = "tensor", dtypes=None, shape=None, ndim=None) -> np.ndarray:
    """Tensor -> numpy array; bfloat16 is widened to float32 exactly."""
    a = decode_raw(t, name=name, dtypes=dtypes, shape=shape, ndim=ndim)
    return bf16_bits_to_float32(a) if t.dtype == BFLOAT16 else a
