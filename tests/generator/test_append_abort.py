"""MemoryClient.append with a request iterator that raises (a Memorize window that failed): when
the call returns, the memory service has rolled the stream's rows back, so the memory holds
nothing of them and a retry on the same memory is taken at once. Real memory service.

The client used to let gRPC cancel the call, which the memory service (grpc.aio) may see as the
stream's end: such a stream was sometimes finished with the rows it got, and the retry met the
stream still open (FAILED_PRECONDITION). It now ends the stream with an ``abort`` message."""

from __future__ import annotations

import numpy as np
import pytest

from extmind import row_wire
from extmind.tensor import FLOAT16
from extmind.v1 import memory_pb2
from services.generator.memory_client import MemoryClient
from tests.memory import helpers as h

LAYERS, HEADS, ROWS, DIM = 4, 2, 64, 16


@pytest.fixture(scope="module")
def client(module_memory_service):
    c = MemoryClient(module_memory_service.address)
    yield c
    c.close()


def _messages(mid, K, V, layers):
    for layer in layers:
        yield row_wire.append_request(mid, layer, K[layer], V[layer], FLOAT16)


def test_a_failed_request_iterator_leaves_no_rows_and_the_retry_is_taken(client):
    K, V = h.random_kv(np.random.default_rng(7), LAYERS, HEADS, ROWS, DIM, FLOAT16)
    layout = memory_pb2.MemoryLayout(num_layers=LAYERS, num_kv_heads=HEADS, head_dim=DIM, dtype=FLOAT16)
    for i in range(25):  # the old race lost a few times in a hundred per try
        mid = f"abort-{i}"
        client.create_memory(
            memory_id=mid, layout=layout, fingerprint="fp", token_ids=range(ROWS), positions=(), labels={}
        )

        def failing(mid=mid):
            yield from _messages(mid, K, V, range(2))
            raise RuntimeError("the window's forward failed")

        with pytest.raises(RuntimeError, match="forward failed"):
            client.append(failing())
        m = client.get_memory(mid)
        assert (m.state, m.bytes) == (memory_pb2.MEMORY_STATE_BUILDING, 0), (i, m)
        resp = client.append(_messages(mid, K, V, range(LAYERS)))  # the same memory, at once
        assert resp.state == memory_pb2.MEMORY_STATE_READY and list(resp.rows_per_layer) == [ROWS] * LAYERS
