"""SearchMemory's answer serialized by hand, as ``row_wire`` does for rows: the same bytes
protobuf writes for a SearchMemoryResponse (and a SearchMemoryStreamResponse holding one), with
the tensors joined in behind their headers in one copy.

REMOTE retrieval asks for one answer per layer per decode step, [H, q, k] scores and indices and
[H, q, k, d] keys and values: 686 KiB for 8 sequences of the 1 B model. Built through protobuf's
classes each tensor is copied three times (``tobytes``, into the message, ``SerializeToString``):
0.088 ms there, 0.019 ms here (2-core x86_64; bench/remote_round_trip.py). The memory service
passes these bytes to gRPC as they are (``services/memory/servicer.register``).
"""

from __future__ import annotations

import numpy as np

from extmind import row_wire, tensor

_SCORES, _INDICES, _KEYS, _VALUES = 1, 2, 3, 4  # SearchMemoryResponse (protos/extmind/v1/memory.proto)
_RESULT = 1  # SearchMemoryStreamResponse.result


def _fields(scores: np.ndarray, indices: np.ndarray, keys, values, dtype: int) -> list:
    parts = [
        *row_wire.tensor_field(_SCORES, np.asarray(scores, tensor.STORAGE[tensor.FLOAT32]), tensor.FLOAT32),
        *row_wire.tensor_field(_INDICES, np.asarray(indices, tensor.STORAGE[tensor.INT64]), tensor.INT64),
    ]
    if keys is not None:
        parts += row_wire.tensor_field(_KEYS, keys, dtype) + row_wire.tensor_field(_VALUES, values, dtype)
    return parts


def search_response(scores: np.ndarray, indices: np.ndarray, keys=None, values=None, dtype: int = 0) -> bytes:
    """The serialized SearchMemoryResponse of scores (float32 [H, q, k]), indices (int64 [H, q, k])
    and, when given, keys and values ([H, q, k, d] storage arrays of ``dtype``, bfloat16 as its
    uint16 bits). Raises TypeError for keys or values that are not ``dtype``'s storage."""
    return b"".join(_fields(scores, indices, keys, values, _checked(keys, values, dtype)))


def stream_response(scores: np.ndarray, indices: np.ndarray, keys=None, values=None, dtype: int = 0) -> bytes:
    """The serialized SearchMemoryStreamResponse whose ``result`` is ``search_response``'s message."""
    fields = _fields(scores, indices, keys, values, _checked(keys, values, dtype))
    return b"".join(row_wire.message_field(_RESULT, fields))


def _checked(keys, values, dtype: int) -> int:
    if keys is not None:
        storage = tensor.STORAGE[dtype]
        for a in (keys, values):
            if a.dtype != storage:
                raise TypeError(f"vectors of {tensor.dtype_name(dtype)} are {storage} storage, not {a.dtype}")
    return dtype
