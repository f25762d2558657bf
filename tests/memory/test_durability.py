"""Restarts and crashes: the same answers after a restart on the same Redis; kill -9 in the
middle of an append loses no acknowledged memory and leaves no partial one READY; Redis killed
right after an acknowledgement keeps the rows; the embedded Redis is started and stopped."""

from __future__ import annotations

import os
import threading
import time

import grpc
import numpy as np
import pytest

from extmind.service_procs import ServiceProcess
from extmind.tensor import BFLOAT16, FLOAT16, FLOAT32, encode
from extmind.v1 import memory_pb2 as pb
from services.memory import kv_layout, kv_store
from tests.memory import helpers as h

READY, BUILDING = pb.MEMORY_STATE_READY, pb.MEMORY_STATE_BUILDING


def snapshot(stub, ids, Qs):
    """Everything a client can observe of ``ids``."""
    out = {}
    for mid in ids:
        m = stub.GetMemory(pb.GetMemoryRequest(memory_id=mid, include_tokens=True), timeout=10).memory
        out[mid] = (
            m.SerializeToString(deterministic=True),
            {k: (a.tobytes(), b.tobytes()) for k, (a, b) in h.fetch(stub, mid).items()},
        )
    for i, (ids_, layer, Q, k) in enumerate(Qs):
        s, idx, keys, values = h.search(stub, ids_, layer, Q, k, return_vectors=True, threshold=0.05)
        out[f"q{i}"] = (s.tobytes(), idx.tobytes(), keys.tobytes(), values.tobytes())
    out["list"] = [
        m.SerializeToString(deterministic=True)
        for m in stub.ListMemories(pb.ListMemoriesRequest(page_size=1000), timeout=10).memories
    ]
    return out


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_restart_serves_the_same_answers(memory_service, how):
    stub = memory_service.stub()
    rng = np.random.default_rng(11)
    ids = []
    for i, dtype in enumerate([FLOAT32, FLOAT16, BFLOAT16]):
        K, V = h.random_kv(rng, 3, 2, 50 + 10 * i, 32, dtype)
        h.build(stub, f"r{i}", K, V, dtype, chunk_rows=17)
        ids.append(f"r{i}")
    K, V = h.random_kv(rng, 3, 2, 40, 32, FLOAT16)
    h.build(stub, "r3", K, V, FLOAT16)
    h.create(stub, "building", K, FLOAT16)
    stub.AppendMemory(h.append_messages("building", K[:2], V[:2], FLOAT16), timeout=10)
    Qs = [([mid], 1, rng.standard_normal((8, 3, 32)).astype(np.float32), 20) for mid in ids + ["r3"]]
    Qs.append((["r1", "r3"], 2, rng.standard_normal((4, 2, 32)).astype(np.float32), 70))
    before = snapshot(stub, ids + ["r3"], Qs)
    building = stub.GetMemory(pb.GetMemoryRequest(memory_id="building"), timeout=10).memory

    memory_service.kill() if how == "sigkill" else memory_service.stop()
    memory_service.start()
    stub = memory_service.stub()
    assert snapshot(stub, ids + ["r3"], Qs) == before
    assert stub.GetMemory(pb.GetMemoryRequest(memory_id="building"), timeout=10).memory == building
    # The BUILDING memory can be finished after the restart.
    assert stub.AppendMemory(h.append_messages("building", K, V, FLOAT16, layer_order=[2]), timeout=10).state == READY


def _big_stream(memory_id, K, V, dtype, sent: list, pause: float):
    for layer in range(K.shape[0]):
        yield pb.AppendMemoryRequest(
            memory_id=memory_id, layer=layer, keys=encode(K[layer], dtype=dtype), values=encode(V[layer], dtype=dtype)
        )
        sent.append(layer)
        time.sleep(pause)


@pytest.mark.slow
@pytest.mark.parametrize("token_ids", [True, False], ids=["token_ids", "close_driven"])
def test_kill_9_mid_append(memory_service, redis_server, token_ids):
    stub = memory_service.stub()
    rng = np.random.default_rng(5)
    # Acknowledged before the crash.
    Ka, Va = h.random_kv(rng, 2, 2, 30, 16, FLOAT16)
    h.build(stub, "acked", Ka, Va, FLOAT16, token_ids=token_ids)
    # In flight during the crash: 6 layers of 2 x 8 MiB each, one layer every 0.3 s, so several
    # batches reach Redis before the kill.
    Kb, Vb = h.random_kv(rng, 6, 8, 4096, 128, FLOAT16)
    h.create(stub, "partial", Kb, FLOAT16, token_ids=token_ids)
    sent: list[int] = []
    errors = []

    def run():
        try:
            stub.AppendMemory(_big_stream("partial", Kb, Vb, FLOAT16, sent, 0.3), timeout=60)
        except grpc.RpcError as e:
            errors.append(e.code())

    t = threading.Thread(target=run)
    t.start()
    while len(sent) < 4:
        time.sleep(0.01)
    memory_service.kill()
    t.join()
    assert errors, "the stream must not have been acknowledged"

    # What Redis holds right after the crash: whole chunks only, counters matching the chunks.
    r = kv_store.sync_client(redis_server.url)
    meta = kv_layout.MemoryMeta.from_hash(r.hgetall(kv_layout.meta_key("partial")))
    assert meta.state == "BUILDING"
    layers = kv_store.read_layers(r, meta, np.dtype("<f2"))  # raises if counters and chunks disagree
    for layer, (k, v) in layers.items():
        assert np.array_equal(k, Kb[layer][:, : k.shape[1]]) and np.array_equal(v, Vb[layer][:, : v.shape[1]])
    assert any(n > 0 for n in meta.rows), "the test should crash after some rows reached Redis"
    r.close()

    memory_service.start()
    stub = memory_service.stub()
    got = stub.GetMemory(pb.GetMemoryRequest(memory_id="partial"), timeout=10).memory
    assert got.state == BUILDING
    with pytest.raises(grpc.RpcError) as e:
        h.search(stub, ["partial"], 0, np.ones((8, 1, 128), np.float32), 3)
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    fetched = h.fetch(stub, "acked")
    assert all(np.array_equal(fetched[i][0], Ka[i]) and np.array_equal(fetched[i][1], Va[i]) for i in range(2))
    assert stub.GetMemory(pb.GetMemoryRequest(memory_id="acked"), timeout=10).memory.state == READY
    # The client resumes from rows_per_layer and completes the memory.
    rows = (
        list(stub.AppendMemory(iter([pb.AppendMemoryRequest(memory_id="partial")]), timeout=10).rows_per_layer)
        if token_ids
        else None
    )
    if token_ids:

        def rest():
            for layer, n in enumerate(rows):
                if n < 4096:
                    yield pb.AppendMemoryRequest(
                        memory_id="partial", layer=layer, keys=encode(Kb[layer][:, n:]), values=encode(Vb[layer][:, n:])
                    )

        assert stub.AppendMemory(rest(), timeout=60).state == READY
        fetched = h.fetch(stub, "partial")
        assert all(np.array_equal(fetched[i][0], Kb[i]) for i in range(6))


@pytest.mark.slow
def test_acknowledged_rows_survive_redis_kill_9(memory_service, redis_server):
    stub = memory_service.stub()
    rng = np.random.default_rng(6)
    K, V = h.random_kv(rng, 2, 4, 200, 64, BFLOAT16)
    h.build(stub, "durable", K, V, BFLOAT16, chunk_rows=64)
    redis_server.kill()  # no shutdown save: only the fsynced AOF survives
    redis_server.start()
    memory_service.kill()
    memory_service.start()
    stub = memory_service.stub()
    fetched = h.fetch(stub, "durable")
    assert all(np.array_equal(fetched[i][0], K[i]) and np.array_equal(fetched[i][1], V[i]) for i in range(2))


def test_redis_down_is_unavailable_then_recovers(memory_service, redis_server):
    stub = memory_service.stub()
    rng = np.random.default_rng(8)
    K, V = h.random_kv(rng, 1, 1, 10, 8, FLOAT32)
    h.build(stub, "up", K, V, FLOAT32)
    h.search(stub, ["up"], 0, np.ones((1, 1, 8), np.float32), 2)  # in RAM now (READY loads it in the background)
    redis_server.stop()
    for call in (
        lambda: stub.GetMemory(pb.GetMemoryRequest(memory_id="up"), timeout=10),
        lambda: stub.ListMemories(pb.ListMemoriesRequest(), timeout=10),
        lambda: h.create(stub, "down", K, FLOAT32),
        lambda: stub.AppendMemory(h.append_messages("up", K, V, FLOAT32), timeout=10),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert "Redis" in e.value.details()
    # Memories already in RAM still answer searches.
    h.search(stub, ["up"], 0, np.ones((1, 1, 8), np.float32), 2)
    redis_server.start()
    assert stub.GetMemory(pb.GetMemoryRequest(memory_id="up"), timeout=10).memory.state == READY
    h.build(stub, "after", K, V, FLOAT32)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_embedded_redis_starts_persists_and_stops(tmp_path, how):
    data = str(tmp_path / "data")
    svc = ServiceProcess(
        "services.memory",
        ["--data-dir", data, "--log-format", "text"],
        log_dir=tmp_path,
        env={"REDIS_URL": ""},
        health_service="extmind.v1.MemoryService",
    )
    try:
        svc.start()
        with open(os.path.join(data, "redis.pid")) as f:
            redis_pid = int(f.read())
        assert _alive(redis_pid)
        assert os.path.exists(os.path.join(data, "appendonlydir")) or os.path.exists(
            os.path.join(data, "appendonly.aof")
        )
        with svc.channel() as ch:
            from extmind.v1 import memory_pb2_grpc

            stub = memory_pb2_grpc.MemoryServiceStub(ch)
            rng = np.random.default_rng(9)
            K, V = h.random_kv(rng, 2, 2, 20, 8, FLOAT16)
            h.build(stub, "emb", K, V, FLOAT16)
        if how == "sigterm":
            assert svc.stop() == 0
        else:
            svc.kill()
        deadline = time.monotonic() + 10
        while _alive(redis_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(redis_pid), "the embedded redis-server must stop with the service"
        svc.start()
        with svc.channel() as ch:
            stub = memory_pb2_grpc.MemoryServiceStub(ch)
            fetched = h.fetch(stub, "emb")
            assert np.array_equal(fetched[1][0], K[1])
    finally:
        svc.stop()


def test_a_damaged_memory_does_not_keep_the_others_offline(memory_service, redis_server):
    stub = memory_service.stub()
    rng = np.random.default_rng(12)
    K, V = h.random_kv(rng, 2, 2, 30, 8, FLOAT32)
    h.build(stub, "healthy", K, V, FLOAT32)
    h.build(stub, "damaged", K, V, FLOAT32, chunk_rows=10)
    r = redis_server.client()
    name = r.lrange(kv_layout.chunk_list_key("damaged", 1), 0, -1)[1].decode()
    r.delete(kv_layout.chunk_key("damaged", "v", 1, name))  # lose one chunk behind the service's back
    memory_service.kill()
    memory_service.start()
    stub = memory_service.stub()
    h.search(stub, ["healthy"], 1, np.ones((2, 1, 8), np.float32), 3)
    with pytest.raises(grpc.RpcError) as e:
        h.search(stub, ["damaged"], 1, np.ones((2, 1, 8), np.float32), 3)
    assert e.value.code() == grpc.StatusCode.INTERNAL and "damaged" in e.value.details()
    assert "could not load a READY memory" in memory_service.log_tail(200)
    stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="damaged"), timeout=10)  # and it can be deleted
    assert r.keys("*mem:damaged*") == []
