"""The two messages that carry KV rows in bulk, serialized by hand from numpy rows:
AppendMemoryRequest (Memorize -> memory service) and FetchMemoryResponse (memory service ->
generator).

Building them through protobuf's Python classes copies each tensor's bytes four times on the way
to gRPC (``tobytes``, the Tensor field, the message field, ``SerializeToString``); here the small
fields are serialized by protobuf and the row bytes are joined in behind them with one copy: the
same messages on the wire (docs/contract.md), parsed by any protobuf reader. The senders pass
these bytes to gRPC as they are (``MemoryClient.append``; the memory service's FetchMemory handler).
"""

from __future__ import annotations

import numpy as np

from extmind import tensor
from extmind.v1 import common_pb2, memory_pb2

_LEN = 2  # protobuf wire type of length-delimited fields
_KEYS, _VALUES = 3, 4  # AppendMemoryRequest's and FetchMemoryResponse's (protos/extmind/v1/memory.proto)
_DATA = 3  # Tensor.data


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _tag(field: int) -> bytes:
    return _varint(field << 3 | _LEN)


def _row_bytes(a: np.ndarray) -> list:
    """Buffers whose concatenation is ``a``'s bytes in row-major order, without copying when ``a``
    or each of its leading slices (the heads of a [KVH, n, d] slice of rows) is contiguous."""
    if a.flags.c_contiguous:
        return [memoryview(a).cast("B")] if a.size else []
    if a.ndim > 1 and all(x.flags.c_contiguous for x in a):
        return [memoryview(x).cast("B") for x in a if x.size]
    return [a.tobytes()]


def _tensor_field(field: int, a: np.ndarray, dtype: int) -> list:
    """The buffers of one Tensor field of ``a`` (numpy storage of ``dtype``, see ``tensor.STORAGE``)."""
    header = common_pb2.Tensor(dtype=dtype, shape=list(a.shape)).SerializeToString()
    data_head = _tag(_DATA) + _varint(a.nbytes) if a.nbytes else b""
    body = len(header) + len(data_head) + a.nbytes
    return [_tag(field) + _varint(body), header, data_head, *_row_bytes(a)]


def _check(keys: np.ndarray, values: np.ndarray, dtype: int) -> None:
    storage = tensor.STORAGE[dtype]
    for a in (keys, values):
        if a.dtype != storage:
            raise TypeError(f"rows of {tensor.dtype_name(dtype)} are {storage} storage, not {a.dtype}")


def append_request(memory_id: str, layer: int, keys: np.ndarray, values: np.ndarray, dtype: int) -> bytes:
    """The serialized AppendMemoryRequest of ``layer``'s rows: ``keys`` and ``values`` [KVH, n, d]
    numpy storage arrays of ``dtype`` (bfloat16 as uint16 bits; any strides). Raises TypeError
    for an array that is not ``dtype``'s storage."""
    _check(keys, values, dtype)
    head = memory_pb2.AppendMemoryRequest(memory_id=memory_id, layer=layer).SerializeToString()
    return b"".join([head, *_tensor_field(_KEYS, keys, dtype), *_tensor_field(_VALUES, values, dtype)])


def fetch_response(
    memory_id: str, layer: int, row_offset: int, keys: np.ndarray, values: np.ndarray, dtype: int
) -> bytes:
    """The serialized FetchMemoryResponse of a slice of ``layer``'s rows starting at ``row_offset``
    (``keys``, ``values`` as for ``append_request``)."""
    _check(keys, values, dtype)
    head = memory_pb2.FetchMemoryResponse(memory_id=memory_id, layer=layer, row_offset=row_offset).SerializeToString()
    return b"".join([head, *_tensor_field(_KEYS, keys, dtype), *_tensor_field(_VALUES, values, dtype)])


def as_is(message) -> bytes:
    """gRPC serializer for a stream of messages some of which are serialized already."""
    return message if isinstance(message, bytes) else message.SerializeToString()
