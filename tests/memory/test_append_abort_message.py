"""AppendMemory's ``abort`` message over gRPC (real memory service): the stream ends CANCELLED
with none of its rows stored, the rows of earlier streams kept, and the memory takes the next
stream at once."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from extmind.tensor import FLOAT16
from extmind.v1 import memory_pb2 as pb

from . import helpers as h


def test_abort_removes_the_streams_rows_and_keeps_earlier_ones(memory_service):
    stub = memory_service.stub()
    K, V = h.random_kv(np.random.default_rng(5), 3, 2, 16, 8, FLOAT16)
    h.create(stub, "ab", K, FLOAT16)
    first = stub.AppendMemory(h.append_messages("ab", K[:1], V[:1], FLOAT16), timeout=30)  # layer 0, kept
    assert list(first.rows_per_layer) == [16, 0, 0]

    def aborted():
        yield from h.append_messages("ab", K, V, FLOAT16, layer_order=[1, 2])
        yield pb.AppendMemoryRequest(abort=True)

    with pytest.raises(grpc.RpcError) as e:
        stub.AppendMemory(aborted(), timeout=30)
    assert e.value.code() == grpc.StatusCode.CANCELLED and "none of its rows are stored" in e.value.details()
    m = stub.GetMemory(pb.GetMemoryRequest(memory_id="ab"), timeout=30).memory
    assert m.state == pb.MEMORY_STATE_BUILDING and m.bytes == first.bytes_stored  # layer 0's rows only
    rest = stub.AppendMemory(h.append_messages("ab", K, V, FLOAT16, layer_order=[1, 2]), timeout=30)
    assert rest.state == pb.MEMORY_STATE_READY and list(rest.rows_per_layer) == [16, 16, 16]


def test_abort_as_the_first_message_touches_nothing(memory_service):
    stub = memory_service.stub()
    K, V = h.random_kv(np.random.default_rng(6), 2, 2, 8, 8, FLOAT16)
    h.create(stub, "ab1", K, FLOAT16)
    with pytest.raises(grpc.RpcError) as e:
        stub.AppendMemory(iter([pb.AppendMemoryRequest(memory_id="ab1", abort=True)]), timeout=30)
    assert e.value.code() == grpc.StatusCode.CANCELLED
    assert stub.AppendMemory(h.append_messages("ab1", K, V, FLOAT16), timeout=30).state == pb.MEMORY_STATE_READY
