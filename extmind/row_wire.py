"""The two messages that carry KV rows in bulk, serialized by hand from numpy rows:
AppendMemoryRequest (Memorize -> memory service) and FetchMemoryResponse (memory service ->
generator).

Building them through protobuf's Python classes copies each tensor's bytes four times on the way
to gRPC (``tobytes``, the Tensor field, the message field, ``SerializeToString``); here the small
fields are serialized by protobuf and the row bytes are joined in behind them with one copy: the
same messages on the wire (docs/contract.md), parsed by any protobuf reader. The senders pass
these bytes to gRPC as they are (``MemoryClient.append``; the memory service's FetchMemory handler).
The generator reads FetchMemoryResponse with ``read_fetch_response``: the rows stay views of the
received bytes instead of being copied out of the message.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

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
    memory_id: str,
    layer: int,
    row_offset: int,
    keys: np.ndarray,
    values: np.ndarray,
    dtype: int,
    create_time: Timestamp | None = None,
) -> bytes:
    """The serialized FetchMemoryResponse of a slice of ``layer``'s rows starting at ``row_offset``
    (``keys``, ``values`` as for ``append_request``), naming the memory's ``create_time``
    (None = left unset)."""
    _check(keys, values, dtype)
    head = memory_pb2.FetchMemoryResponse(
        memory_id=memory_id, layer=layer, row_offset=row_offset, create_time=create_time
    ).SerializeToString()
    return b"".join([head, *_tensor_field(_KEYS, keys, dtype), *_tensor_field(_VALUES, values, dtype)])


def as_is(message) -> bytes:
    """gRPC serializer for a stream of messages some of which are serialized already."""
    return message if isinstance(message, bytes) else message.SerializeToString()


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class RawTensor:
    """A Tensor field read without copying: ``data`` is a view of the received bytes
    (``tensor.decode_raw`` takes it like a Tensor message)."""

    dtype: int
    shape: tuple
    data: memoryview


@dataclass(frozen=True)
class FetchedSlice:
    """A FetchMemoryResponse read without copying its rows (``read_fetch_response``); a missing
    tensor reads as an empty one, as in the message; a missing create_time is None, and
    ``HasField("create_time")`` answers as the message's does."""

    memory_id: str
    layer: int
    row_offset: int
    keys: RawTensor
    values: RawTensor
    create_time: Timestamp | None = None

    def HasField(self, name: str) -> bool:  # noqa: N802 - the protobuf message's name
        if name != "create_time":
            raise ValueError(f"FetchedSlice answers HasField for create_time only, not {name!r}")
        return self.create_time is not None


@dataclass(frozen=True)
class AppendedRows:
    """An AppendMemoryRequest read without copying its rows (``read_append_request``); a missing
    tensor is None. ``HasField`` answers as the message's does."""

    memory_id: str
    layer: int
    keys: RawTensor | None
    values: RawTensor | None
    abort: bool = False

    def HasField(self, name: str) -> bool:  # noqa: N802 - the protobuf message's name
        return getattr(self, name) is not None


class _Unexpected(Exception):
    """Bytes this reader leaves to protobuf."""


def _read_varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise _Unexpected
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _signed(value: int, bits: int) -> int:
    """A varint's value as protobuf reads a field of ``bits``-bit signed integers (int32 enums,
    int64): the low bits, two's complement."""
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _fields(buf: memoryview):
    """(field number, value) of every field: an int for varints, a memoryview for
    length-delimited fields; fixed-width fields are skipped, anything else (field number 0, a
    field cut short, groups) is _Unexpected."""
    i = 0
    while i < len(buf):
        key, i = _read_varint(buf, i)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise _Unexpected
        if wire == 0:
            value, i = _read_varint(buf, i)
        elif wire == _LEN:
            n, i = _read_varint(buf, i)
            if i + n > len(buf):
                raise _Unexpected
            value, i = buf[i : i + n], i + n
        elif wire in (1, 5):  # fixed64 / fixed32: no such field here, skipped like unknown ones
            i += 8 if wire == 1 else 4
            if i > len(buf):
                raise _Unexpected
            continue
        else:
            raise _Unexpected
        yield field, value


def _tensor(buf: memoryview) -> RawTensor:
    dtype, shape, data = 0, [], buf[:0]
    for field, value in _fields(buf):
        # Read as protobuf reads them: dtype an int32 enum, shape int64 (a huge varint is a
        # negative dimension, which the tensor's checks name as such).
        if field == 1 and isinstance(value, int):
            dtype = _signed(value, 32)
        elif field == 2:  # packed, or one element per field
            if isinstance(value, int):
                shape.append(_signed(value, 64))
            else:
                j = 0
                while j < len(value):
                    dim, j = _read_varint(value, j)
                    shape.append(_signed(dim, 64))
        elif field == _DATA and not isinstance(value, int):
            data = value
        elif field in (1, _DATA):
            raise _Unexpected
    return RawTensor(dtype, tuple(shape), data)


def _timestamp(buf: memoryview) -> Timestamp:
    """A Timestamp field's bytes, read by protobuf (a few bytes: nothing to save by hand)."""
    try:
        return Timestamp.FromString(bytes(buf))
    except DecodeError:
        raise _Unexpected from None


def _read(data: bytes, fields: dict) -> dict:
    """Reads a message of string / integer / Tensor / Timestamp fields (``fields``: number ->
    (name, type)) without copying the tensors' data. Raises _Unexpected for what protobuf must
    read instead: a field of another wire type, a message field sent twice (protobuf merges the
    two), malformed bytes."""
    buf = memoryview(data)
    out = {}
    for number, value in _fields(buf):
        if number not in fields:
            continue  # unknown fields are skipped, as protobuf does
        name, kind = fields[number]
        if (kind in (int, bool)) != isinstance(value, int) or (kind in (RawTensor, Timestamp) and name in out):
            raise _Unexpected
        if kind is int:
            value &= 0xFFFFFFFF  # every integer field here is a uint32: protobuf keeps the low 32 bits
        elif kind is bool:
            value = value != 0  # as protobuf reads a bool's varint
        elif kind is str:
            value = str(value, "utf-8")
        elif kind is RawTensor:
            value = _tensor(value)
        elif kind is Timestamp:
            value = _timestamp(value)
        out[name] = value
    return out


_FETCH_FIELDS = {
    1: ("layer", int),
    2: ("row_offset", int),
    _KEYS: ("keys", RawTensor),
    _VALUES: ("values", RawTensor),
    5: ("memory_id", str),
    6: ("create_time", Timestamp),
}
_APPEND_FIELDS = {
    1: ("memory_id", str),
    2: ("layer", int),
    _KEYS: ("keys", RawTensor),
    _VALUES: ("values", RawTensor),
    5: ("abort", bool),
}


def read_fetch_response(data: bytes):
    """A serialized FetchMemoryResponse -> FetchedSlice whose tensors' ``data`` are views of
    ``data`` (the rows are not copied), or the protobuf message for bytes this reader leaves to
    protobuf (see ``_read``; malformed bytes raise protobuf's DecodeError). FetchMemory's gRPC
    deserializer in ``MemoryClient``."""
    try:
        got = _read(data, _FETCH_FIELDS)
    except (_Unexpected, UnicodeDecodeError):
        return memory_pb2.FetchMemoryResponse.FromString(data)
    empty = RawTensor(0, (), memoryview(b""))
    return FetchedSlice(
        got.get("memory_id", ""),
        got.get("layer", 0),
        got.get("row_offset", 0),
        got.get("keys", empty),
        got.get("values", empty),
        got.get("create_time"),
    )


def read_append_request(data: bytes):
    """A serialized AppendMemoryRequest -> AppendedRows whose tensors' ``data`` are views of
    ``data``, or the protobuf message (as ``read_fetch_response``). AppendMemory's gRPC
    deserializer in the memory service."""
    try:
        got = _read(data, _APPEND_FIELDS)
    except (_Unexpected, UnicodeDecodeError):
        return memory_pb2.AppendMemoryRequest.FromString(data)
    return AppendedRows(
        got.get("memory_id", ""), got.get("layer", 0), got.get("keys"), got.get("values"), got.get("abort", False)
    )
