"""DeleteMemory with ``create_time`` (real memory service): it deletes only the memory created at
that time; a memory deleted and created again under the id since is kept (FAILED_PRECONDITION),
so a failed Memorize's clean-up cannot delete the memory another client made under the same id."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from extmind.tensor import FLOAT16
from extmind.v1 import memory_pb2 as pb

from . import helpers as h


def test_delete_with_create_time_spares_a_memory_created_again(memory_service):
    stub = memory_service.stub()
    K, V = h.random_kv(np.random.default_rng(8), 2, 2, 8, 8, FLOAT16)
    old = h.create(stub, "inc", K, FLOAT16)
    stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="inc"), timeout=30)
    new = h.create(stub, "inc", K, FLOAT16)  # another incarnation under the same id
    assert new.create_time != old.create_time
    with pytest.raises(grpc.RpcError) as e:
        stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="inc", create_time=old.create_time), timeout=30)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "created again" in e.value.details()
    resp = stub.AppendMemory(h.append_messages("inc", K, V, FLOAT16), timeout=30)  # kept, and writable
    assert resp.state == pb.MEMORY_STATE_READY
    listed = [m.memory_id for m in stub.ListMemories(pb.ListMemoriesRequest(), timeout=30).memories]
    assert "inc" in listed
    stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="inc", create_time=new.create_time), timeout=30)
    with pytest.raises(grpc.RpcError) as e:
        stub.GetMemory(pb.GetMemoryRequest(memory_id="inc"), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as e:  # gone: NOT_FOUND, with or without a create_time
        stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="inc", create_time=new.create_time), timeout=30)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
