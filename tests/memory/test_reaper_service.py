"""Abandoned BUILDING memories over gRPC: a memory service with a tiny MEMORY_BUILDING_TTL deletes
what its builders left (a dropped stream, a create never followed by rows, a service killed
mid-stream), keeps memories with a stream open and READY ones, and refuses appends afterwards."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np

from extmind.tensor import FLOAT32
from extmind.v1 import memory_pb2 as pb
from tests.helpers import code_of
from tests.memory import helpers as h

READY, BUILDING = pb.MEMORY_STATE_READY, pb.MEMORY_STATE_BUILDING


def _keys(redis_server, memory_id):
    return redis_server.client().keys(f"*mem:{memory_id}*")


def _wait_gone(redis_server, memory_id, limit=15.0) -> float:
    """Seconds until every key of the memory left Redis (polled; fails after ``limit``)."""
    t0 = time.monotonic()
    while _keys(redis_server, memory_id):
        assert time.monotonic() - t0 < limit, f"{memory_id} was not reaped within {limit}s"
        time.sleep(0.05)
    return time.monotonic() - t0


class OpenStream:
    """An AppendMemory stream that sends ``messages`` and then stays open, idle, until ``close()``
    (which sends ``rest`` and ends it) or ``cancel()`` (the client drops it)."""

    def __init__(self, stub, messages, rest=()):
        self.gate = threading.Event()

        def gen():
            yield from messages
            self.gate.wait(30)
            yield from rest

        self.future = stub.AppendMemory.future(gen(), timeout=60)
        time.sleep(0.5)  # the messages have reached the server

    def close(self):
        self.gate.set()
        return self.future.result()

    def cancel(self):
        self.future.cancel()
        self.gate.set()


def test_abandoned_memories_are_reaped_open_and_ready_ones_kept(memory_service_factory, redis_server):
    svc = memory_service_factory(env={"MEMORY_BUILDING_TTL": "1"})
    stub = svc.stub()
    K, V = h.random_kv(np.random.default_rng(0), 2, 1, 6, 4, FLOAT32)
    h.build(stub, "ready", K, V, FLOAT32)
    h.create(stub, "never", K, FLOAT32)  # created, never appended
    h.create(stub, "dropped", K, FLOAT32)  # a builder that dropped its stream mid-way
    OpenStream(stub, h.append_messages("dropped", K[:1], V[:1], FLOAT32)).cancel()
    h.create(stub, "half", K, FLOAT32)  # a builder that stored one layer and never came back
    assert stub.AppendMemory(h.append_messages("half", K[:1], V[:1], FLOAT32), timeout=30).state == BUILDING
    assert _keys(redis_server, "half")
    h.create(stub, "idle", K, FLOAT32)  # a stream open on this service, idle: kept however long
    idle = OpenStream(
        stub,
        h.append_messages("idle", K[:1], V[:1], FLOAT32),
        h.append_messages("idle", K, V, FLOAT32, layer_order=[1]),
    )
    opened = time.monotonic()
    h.create(stub, "slow", K, FLOAT32)  # a stream appending slowly, a row every 0.5 s (> TTL overall)

    def slow_messages():
        for msg in h.append_messages("slow", K, V, FLOAT32, chunk_rows=2):
            time.sleep(0.5)
            yield msg

    slow = stub.AppendMemory.future(slow_messages(), timeout=60)

    for gone in ("never", "dropped", "half"):
        _wait_gone(redis_server, gone)
    time.sleep(max(0.0, opened + 3.0 - time.monotonic()))  # 3 TTLs since "idle" last sent anything
    assert stub.GetMemory(pb.GetMemoryRequest(memory_id="idle"), timeout=10).memory.state == BUILDING
    assert slow.result().state == READY
    done = idle.close()
    assert done.state == READY and list(done.rows_per_layer) == [6, 6]

    # What is left: the READY memories, whole.
    listed = stub.ListMemories(pb.ListMemoriesRequest(), timeout=10).memories
    assert sorted(m.memory_id for m in listed) == ["idle", "ready", "slow"]
    for memory_id in ("ready", "slow"):
        fetched = h.fetch(stub, memory_id)
        assert all(np.array_equal(fetched[layer][0], K[layer]) for layer in range(2))
    reaps = [line for line in svc.log_tail(400).splitlines() if "abandoned BUILDING memory deleted" in line]
    assert sorted(line.split("memory_id=")[1].split()[0] for line in reaps) == ["dropped", "half", "never"]

    # An append after the reap: NOT_FOUND, and nothing of the memory comes back.
    late = code_of(lambda: stub.AppendMemory(h.append_messages("half", K, V, FLOAT32, layer_order=[1]), timeout=10))
    assert late.code == grpc.StatusCode.NOT_FOUND and "half" in late.details
    assert _keys(redis_server, "half") == []
    assert (
        code_of(lambda: stub.GetMemory(pb.GetMemoryRequest(memory_id="half"), timeout=10)).code
        == grpc.StatusCode.NOT_FOUND
    )


def test_a_restarted_service_reaps_what_a_killed_one_left(memory_service_factory, redis_server):
    """The idle time is kept in Redis: a new service judges a memory by its last append before the
    crash, not by its own start."""
    ttl = 3.0
    first = memory_service_factory()  # the default TTL (600 s): reaps nothing here
    stub = first.stub()
    K, V = h.random_kv(np.random.default_rng(1), 2, 1, 6, 4, FLOAT32)
    h.create(stub, "orphan", K, FLOAT32)
    assert stub.AppendMemory(h.append_messages("orphan", K[:1], V[:1], FLOAT32), timeout=30).state == BUILDING
    stream = OpenStream(stub, h.append_messages("orphan", K, V, FLOAT32, chunk_rows=2, layer_order=[1]))
    last_touch = time.monotonic() - 0.5
    first.kill()  # SIGKILL mid-stream: no rollback, no clean-up
    stream.gate.set()
    assert stream.future.exception() is not None
    assert _keys(redis_server, "orphan")

    time.sleep(max(0.0, last_touch + ttl - time.monotonic()))
    second = memory_service_factory(env={"MEMORY_BUILDING_TTL": str(ttl)})
    serving = time.monotonic()
    stub = second.stub()
    h.create(stub, "young", K, FLOAT32)
    # Reaped at the second service's first sweeps (every ttl / 4), well before a TTL of its own.
    _wait_gone(redis_server, "orphan")
    assert time.monotonic() - serving < ttl
    assert stub.GetMemory(pb.GetMemoryRequest(memory_id="young"), timeout=10).memory.state == BUILDING
    assert [m.memory_id for m in stub.ListMemories(pb.ListMemoriesRequest(), timeout=10).memories] == ["young"]
