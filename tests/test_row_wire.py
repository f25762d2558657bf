"""AppendMemoryRequest and FetchMemoryResponse bytes built by hand are the messages protobuf
builds, for any rows."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp

from extmind import tensor
from extmind.errors import InvalidArgument
from extmind.row_wire import (
    AppendedRows,
    FetchedSlice,
    append_request,
    fetch_response,
    read_append_request,
    read_fetch_response,
)
from extmind.v1 import memory_pb2
from tests.helpers import pb_len_field, pb_tensor, pb_varint

# A create_time as the memory service sets it (microseconds), past 2**31 seconds as from 2038 on.
CREATED = Timestamp(seconds=2**31 + 5, nanos=206_143_000)


@pytest.mark.parametrize("dtype", [tensor.FLOAT16, tensor.BFLOAT16, tensor.FLOAT32])
def test_hand_built_requests_parse_as_the_protobuf_built_ones(dtype):
    rng = np.random.default_rng(0)
    storage = tensor.STORAGE[dtype]
    big = (rng.standard_normal((8, 300, 64)) * 1000).astype(np.float32)
    rows = big.view(np.uint16)[:, :, ::2].copy() if dtype == tensor.BFLOAT16 else big.astype(storage)
    cases = {
        "contiguous": rows,
        "a slice of rows (strided)": rows[:, 17:230],
        "every other dim (no contiguous head)": rows[:, :5, ::2],
        "one row": rows[:, 3:4],
        "no rows": rows[:, :0],
    }
    for name, keys in cases.items():
        values = keys[::-1]  # another strided view
        got = memory_pb2.AppendMemoryRequest.FromString(append_request("mem-1", 130, keys, values, dtype))
        want = memory_pb2.AppendMemoryRequest(
            memory_id="mem-1", layer=130, keys=tensor.encode(keys, dtype), values=tensor.encode(values, dtype)
        )
        assert got == want, name
        assert np.array_equal(tensor.decode_raw(got.keys), keys), name
        read = read_append_request(want.SerializeToString())
        assert isinstance(read, AppendedRows) and (read.memory_id, read.layer) == ("mem-1", 130)
        assert read.HasField("keys") and read.HasField("values")
        assert np.array_equal(tensor.decode_raw(read.values, dtypes=(dtype,), ndim=3), values), name
        for created in (CREATED, None):  # None: a memory service older than create_time
            hand = fetch_response("mem-1", 3, 4096, keys, values, dtype, create_time=created)
            got = memory_pb2.FetchMemoryResponse.FromString(hand)
            want = memory_pb2.FetchMemoryResponse(
                memory_id="mem-1",
                layer=3,
                row_offset=4096,
                keys=tensor.encode(keys, dtype),
                values=tensor.encode(values, dtype),
                create_time=created,
            )
            assert got == want and got.HasField("create_time") == (created is not None), name
            for data in (want.SerializeToString(), hand):
                read = read_fetch_response(data)
                assert isinstance(read, FetchedSlice)
                assert (read.memory_id, read.layer, read.row_offset) == ("mem-1", 3, 4096)
                assert read.HasField("create_time") == (created is not None), name
                assert (read.create_time or Timestamp()) == got.create_time, name
                for raw, sent in ((read.keys, keys), (read.values, values)):
                    assert (raw.dtype, raw.shape) == (dtype, sent.shape)
                    assert np.array_equal(tensor.decode_raw(raw, dtypes=(dtype,), ndim=3), sent), name


def test_rows_of_another_dtype_are_refused():
    wide = np.zeros((1, 1, 2), np.float32)
    with pytest.raises(TypeError, match="float16"):
        append_request("m", 0, wide, wide, tensor.FLOAT16)
    with pytest.raises(TypeError, match="float16"):
        fetch_response("m", 0, 0, wide, wide, tensor.FLOAT16)


def test_reading_a_fetch_response_leaves_what_it_does_not_expect_to_protobuf():
    """Unpacked shapes and unknown fields are read; a tensor sent twice (protobuf merges the two)
    goes to protobuf, and so do malformed bytes, which protobuf refuses."""
    rows = np.arange(12, dtype=np.float16).reshape(1, 3, 4)
    t = tensor.encode(rows, tensor.FLOAT16)
    unpacked = b"\x08\x02" + b"".join(b"\x10" + bytes([d]) for d in rows.shape) + b"\x1a\x18" + rows.tobytes()
    msg = b"\x08\x05" + b"\x1a" + bytes([len(unpacked)]) + unpacked + b"\x70\x07" + b"\x7a\x02hi"  # + unknown 14, 15
    read = read_fetch_response(msg)
    assert isinstance(read, FetchedSlice) and read.layer == 5 and read.keys.shape == (1, 3, 4)
    assert np.array_equal(tensor.decode_raw(read.keys), rows) and read.values.dtype == 0
    twice = memory_pb2.FetchMemoryResponse(keys=t).SerializeToString() * 2
    assert read_fetch_response(twice) == memory_pb2.FetchMemoryResponse.FromString(twice)
    with pytest.raises(DecodeError):
        read_fetch_response(b"\x1a\x7f\x00")


def test_an_append_request_without_rows_reads_as_protobuf_reads_it():
    only_id = memory_pb2.AppendMemoryRequest(memory_id="m").SerializeToString()
    read = read_append_request(only_id)
    assert isinstance(read, AppendedRows) and read.memory_id == "m" and read.layer == 0
    assert not read.HasField("keys") and not read.HasField("values")
    with pytest.raises(InvalidArgument, match="keys is missing"):
        tensor.decode_raw(read.keys, name="keys")
    bad_utf8 = b"\x0a\x02\xff\xfe"  # protobuf refuses a string that is not UTF-8
    with pytest.raises(DecodeError):
        read_append_request(bad_utf8)


async def test_the_memory_service_reads_appends_and_sends_fetches_through_row_wire():
    """``register`` replaces the generated AppendMemory / FetchMemory handlers: requests arrive
    as AppendedRows, answers go out as the servicer's bytes; the other calls are the generated."""
    import grpc

    from extmind.v1 import memory_pb2_grpc
    from services.memory.servicer import MemoryServicer, register

    seen = []

    class Recording(MemoryServicer):
        async def AppendMemory(self, request_iterator, context):  # noqa: N802 - the RPC's name
            async for msg in request_iterator:
                seen.append(type(msg))
            return memory_pb2.AppendMemoryResponse(memory_id="a")

        async def FetchMemory(self, request, context):  # noqa: N802
            rows = np.ones((1, 2, 4), np.float16)
            yield fetch_response(request.memory_id, 0, 0, rows, rows, tensor.FLOAT16)

        async def GetMemory(self, request, context):  # noqa: N802
            return memory_pb2.GetMemoryResponse(memory=memory_pb2.Memory(memory_id=request.memory_id))

    server = grpc.aio.server()
    register(Recording(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = memory_pb2_grpc.MemoryServiceStub(channel)
            rows = np.zeros((1, 2, 4), np.float16)
            done = await stub.AppendMemory(
                iter([memory_pb2.AppendMemoryRequest.FromString(append_request("a", 0, rows, rows, tensor.FLOAT16))])
            )
            fetched = [m async for m in stub.FetchMemory(memory_pb2.FetchMemoryRequest(memory_id="f"))]
            got = await stub.GetMemory(memory_pb2.GetMemoryRequest(memory_id="g"))
    finally:
        await server.stop(None)
    assert seen == [AppendedRows] and done.memory_id == "a" and got.memory.memory_id == "g"
    assert len(fetched) == 1 and fetched[0].memory_id == "f"
    assert np.array_equal(tensor.decode_raw(fetched[0].keys), np.ones((1, 2, 4), np.float16))


def _as_message(read, cls):
    """What ``read_*`` returned, as the protobuf message (to compare with protobuf's reading)."""
    if not isinstance(read, (AppendedRows, FetchedSlice)):  # left to protobuf
        read.DiscardUnknownFields()
        return read
    out = cls(memory_id=read.memory_id, layer=read.layer)
    if isinstance(read, FetchedSlice):
        out.row_offset = read.row_offset
        if read.HasField("create_time"):
            out.create_time.CopyFrom(read.create_time)
    for name in ("keys", "values"):
        raw = getattr(read, name)
        if raw is not None and (raw.dtype or raw.shape or len(raw.data)):
            t = tensor.common_pb2.Tensor(dtype=raw.dtype, shape=raw.shape, data=bytes(raw.data))
            getattr(out, name).CopyFrom(t)
    return out


def test_odd_bytes_read_as_protobuf_reads_them():
    """Integers past their field's width, a huge varint for a dimension, field number 0 and a
    fixed-width field cut short: the readers answer what protobuf answers (or refuse as it does),
    so a raw client gets the same status from the memory service as with the generated code."""
    rows = np.arange(16, dtype=np.float16).reshape(1, 2, 8).tobytes()

    def tensor_bytes(dtype: int, dims, data=rows) -> bytes:
        return pb_tensor(dtype, dims, data)

    good = tensor_bytes(2, [1, 2, 8])
    cases = {
        "layer past 32 bits": pb_len_field(1, b"m") + b"\x10" + pb_varint(2**32 + 1) + pb_len_field(3, good),
        "layer of 64 one bits": b"\x10" + pb_varint(2**64 - 1),
        "dtype past 32 bits": pb_len_field(3, tensor_bytes(2**40 + 2, [1, 2, 8])),
        "dtype -1": pb_len_field(3, tensor_bytes(2**64 - 1, [1, 2, 8])),
        "dimension -1": pb_len_field(3, tensor_bytes(2, [1, 2**64 - 1, 8], b"")),
        "dimension -2**63": pb_len_field(4, tensor_bytes(2, [1, 0, 2**63], b"")),
        "field number 0": pb_len_field(1, b"m") + b"\x00\x05",
        "fixed64 cut short": pb_len_field(1, b"m") + pb_len_field(3, good) + pb_varint(9 << 3 | 1) + b"\0\0",
        "fixed32 cut short": pb_len_field(1, b"m") + pb_varint(9 << 3 | 5) + b"\0",
        "fixed64 whole": pb_len_field(1, b"m") + pb_len_field(3, good) + pb_varint(9 << 3 | 1) + b"\0" * 8,
        "create_time": pb_len_field(3, good) + pb_len_field(6, CREATED.SerializeToString()),
        "create_time empty": pb_len_field(6, b""),
        "create_time twice (merged)": pb_len_field(6, CREATED.SerializeToString()) + pb_len_field(6, b"\x10\x01"),
        "create_time negative": pb_len_field(6, Timestamp(seconds=-3).SerializeToString()),
        "create_time a varint": pb_len_field(3, good) + b"\x30\x07",
        "create_time cut short": pb_len_field(6, b"\x08"),
    }
    pb = memory_pb2
    readers = (read_append_request, pb.AppendMemoryRequest), (read_fetch_response, pb.FetchMemoryResponse)
    for name, data in cases.items():
        for read, cls in readers:
            try:
                want = cls.FromString(data)
            except DecodeError:
                with pytest.raises(DecodeError):
                    read(data)
                continue
            want.DiscardUnknownFields()  # kept by protobuf, skipped by the readers
            assert _as_message(read(data), cls) == want, (name, cls.__name__)
    dim = read_append_request(cases["dimension -1"]).keys
    with pytest.raises(InvalidArgument, match="negative dimension"):
        tensor.decode_raw(dim, name="keys")


def test_an_abort_reads_as_protobuf_reads_it():
    """``abort`` (AppendMemoryRequest field 5, a bool): set, unset, and a varint past one byte
    (protobuf reads any nonzero varint as true)."""
    for msg in (
        memory_pb2.AppendMemoryRequest(abort=True),
        memory_pb2.AppendMemoryRequest(memory_id="m", layer=2),
        memory_pb2.AppendMemoryRequest(memory_id="m", abort=False),
    ):
        data = msg.SerializeToString()
        assert read_append_request(data).abort is memory_pb2.AppendMemoryRequest.FromString(data).abort
    wide = b"\x28\x80\x01"  # field 5, varint 128
    assert read_append_request(wide).abort is True is memory_pb2.AppendMemoryRequest.FromString(wide).abort
