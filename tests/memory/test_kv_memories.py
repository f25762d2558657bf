"""KV memory RPCs round-trip over gRPC against a real Redis."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from extmind.tensor import BFLOAT16, FLOAT16, FLOAT32, encode
from extmind.v1 import memory_pb2 as pb
from tests.helpers import code_of
from tests.memory import helpers as h

READY, BUILDING = pb.MEMORY_STATE_READY, pb.MEMORY_STATE_BUILDING


def test_every_kv_rpc_round_trips(memory_service, redis_server):
    stub = memory_service.stub()
    rng = np.random.default_rng(0)
    K, V = h.random_kv(rng, 3, 2, 12, 16, FLOAT16)
    positions = list(range(5, 17))
    m = h.create(stub, "mem-1", K, FLOAT16, labels={"source": "unit", "lang": "en"}, positions=positions)
    assert m.memory_id == "mem-1" and m.state == BUILDING and m.num_tokens == 12
    assert m.layout == h.layout(3, 2, 16, FLOAT16) and m.model_fingerprint == "fp-test"
    assert dict(m.labels) == {"source": "unit", "lang": "en"} and m.create_time.seconds > 0

    resp = stub.AppendMemory(h.append_messages("mem-1", K, V, FLOAT16, chunk_rows=5), timeout=30)
    assert resp.memory_id == "mem-1" and list(resp.rows_per_layer) == [12, 12, 12]
    assert resp.state == READY and resp.bytes_stored == K.nbytes + V.nbytes

    got = stub.GetMemory(pb.GetMemoryRequest(memory_id="mem-1"), timeout=10).memory
    assert got.state == READY and got.num_tokens == 12 and got.bytes == K.nbytes + V.nbytes
    assert not got.token_ids
    full = stub.GetMemory(pb.GetMemoryRequest(memory_id="mem-1", include_tokens=True), timeout=10).memory
    assert list(full.token_ids) == list(range(1000, 1012)) and list(full.positions) == positions

    listed = stub.ListMemories(pb.ListMemoriesRequest(), timeout=10)
    assert [x.memory_id for x in listed.memories] == ["mem-1"] and not listed.next_page_token

    fetched = h.fetch(stub, "mem-1")
    for layer in range(3):
        assert np.array_equal(fetched[layer][0], K[layer]) and np.array_equal(fetched[layer][1], V[layer])
    assert list(h.fetch(stub, "mem-1", layers=[2, 0])) == [2, 0]

    Q = rng.standard_normal((4, 2, 16)).astype(np.float32)
    scores, idx, _, _ = h.search(stub, ["mem-1"], 1, Q, 3)
    h.check_search(scores, idx, h.cosine_reference(Q, [h.as_float32(K[1], FLOAT16)]), 3)

    stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="mem-1"), timeout=10)
    assert (
        code_of(lambda: stub.GetMemory(pb.GetMemoryRequest(memory_id="mem-1"), timeout=10)).code
        == grpc.StatusCode.NOT_FOUND
    )
    assert code_of(lambda: h.search(stub, ["mem-1"], 0, Q, 3)).code == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: h.fetch(stub, "mem-1")).code == grpc.StatusCode.NOT_FOUND
    # Every key of the memory is gone from Redis, and the listing is empty.
    assert redis_server.client().keys("*mem:mem-1*") == []
    assert not stub.ListMemories(pb.ListMemoriesRequest(), timeout=10).memories
    # The id can be used again.
    h.build(stub, "mem-1", K, V, FLOAT16)


@pytest.mark.parametrize("dtype", [FLOAT32, FLOAT16, BFLOAT16], ids=["f32", "f16", "bf16"])
def test_fetch_returns_exactly_what_was_appended(memory_service, dtype):
    """Odd chunking in, <= 4 MiB chunks out, bit-exact (bf16 bits, fp16 subnormals, signed zeros)."""
    stub = memory_service.stub()
    rng = np.random.default_rng(int(dtype))
    K, V = h.random_kv(rng, 2, 8, 1500, 128, dtype)  # 1500 rows * 8 heads * 128 * 2 tensors > 4 MiB
    if dtype == FLOAT16:
        K[0, 0, 0, :4] = np.array([6e-8, -0.0, 65504, -65504], np.float16)
    if dtype == BFLOAT16:
        K[0, 0, 0, :3] = np.array([0x0001, 0x8000, 0x7F7F], np.uint16)  # subnormal, -0, max
    h.build(stub, "exact", K, V, dtype, chunk_rows=333)
    fetched = h.fetch(stub, "exact")
    for layer in range(2):
        assert fetched[layer][0].dtype == K.dtype
        assert fetched[layer][0].tobytes() == K[layer].tobytes()
        assert fetched[layer][1].tobytes() == V[layer].tobytes()
    chunks = list(stub.FetchMemory(pb.FetchMemoryRequest(memory_id="exact", layers=[1]), timeout=60))
    assert len(chunks) > 1 and all(c.ByteSize() <= 4 * 2**20 for c in chunks)
    assert all(c.keys.dtype == dtype and c.memory_id == "exact" for c in chunks)


def test_append_without_token_ids_becomes_ready_on_close(memory_service):
    stub = memory_service.stub()
    rng = np.random.default_rng(2)
    K, V = h.random_kv(rng, 2, 1, 9, 8, FLOAT32)
    m = h.create(stub, "nt", K, FLOAT32, token_ids=False)
    assert m.num_tokens == 0 and m.state == BUILDING
    # Layer 0 complete, layer 1 short: the stream closes with uneven layers -> still BUILDING.
    msgs = list(h.append_messages("nt", K, V, FLOAT32, chunk_rows=4))
    first = [x for x in msgs if x.layer == 0] + [msgs[-3]]
    resp = stub.AppendMemory(iter(first), timeout=30)
    assert resp.state == BUILDING and list(resp.rows_per_layer) == [9, 4]
    # A message that only names the memory reports the rows stored (resume point).
    probe = stub.AppendMemory(iter([pb.AppendMemoryRequest(memory_id="nt")]), timeout=30)
    assert list(probe.rows_per_layer) == [9, 4] and probe.state == BUILDING and probe.bytes_stored == 0
    rest = stub.AppendMemory(iter(msgs[-2:]), timeout=30)
    assert rest.state == READY and list(rest.rows_per_layer) == [9, 9]
    got = stub.GetMemory(pb.GetMemoryRequest(memory_id="nt"), timeout=10).memory
    assert got.num_tokens == 9 and got.state == READY
    fetched = h.fetch(stub, "nt")
    assert np.array_equal(fetched[1][0], K[1])


def test_ready_takes_no_more_rows_and_failed_stream_changes_nothing(memory_service):
    stub = memory_service.stub()
    rng = np.random.default_rng(3)
    K, V = h.random_kv(rng, 2, 2, 10, 8, FLOAT32)
    h.build(stub, "done", K, V, FLOAT32)
    extra = pb.AppendMemoryRequest(memory_id="done", layer=0, keys=encode(K[0][:, :1]), values=encode(V[0][:, :1]))
    assert code_of(lambda: stub.AppendMemory(iter([extra]), timeout=10)).code == grpc.StatusCode.FAILED_PRECONDITION

    h.create(stub, "half", K, FLOAT32)
    good = list(h.append_messages("half", K, V, FLOAT32, chunk_rows=3))[:5]
    bad = pb.AppendMemoryRequest(memory_id="half", layer=1, keys=encode(K[1][:, :2]), values=encode(V[1][:, :2]))
    bad.keys.data = bad.keys.data[:-1]  # truncated tensor bytes after good chunks
    assert code_of(lambda: stub.AppendMemory(iter(good + [bad]), timeout=10)).code == grpc.StatusCode.INVALID_ARGUMENT
    got = stub.GetMemory(pb.GetMemoryRequest(memory_id="half"), timeout=10).memory
    assert got.state == BUILDING and got.bytes == 0
    assert list(stub.AppendMemory(iter([pb.AppendMemoryRequest(memory_id="half")]), timeout=10).rows_per_layer) == [
        0,
        0,
    ]
    # Too many rows for the token ids: refused, nothing stored.
    over = list(h.append_messages("half", K, V, FLOAT32)) + [extra]
    over[-1].memory_id = "half"
    assert code_of(lambda: stub.AppendMemory(iter(over), timeout=10)).code == grpc.StatusCode.INVALID_ARGUMENT
    assert stub.GetMemory(pb.GetMemoryRequest(memory_id="half"), timeout=10).memory.bytes == 0
    # Now properly.
    assert stub.AppendMemory(h.append_messages("half", K, V, FLOAT32), timeout=10).state == READY


def test_server_generates_ids_and_labels_round_trip(memory_service):
    stub = memory_service.stub()
    req = pb.CreateMemoryRequest(layout=h.layout(1, 1, 4, FLOAT32), model_fingerprint="fp", labels={"a": "b"})
    a = stub.CreateMemory(req, timeout=10).memory
    b = stub.CreateMemory(req, timeout=10).memory
    assert a.memory_id and b.memory_id and a.memory_id != b.memory_id
    assert dict(stub.GetMemory(pb.GetMemoryRequest(memory_id=a.memory_id), timeout=10).memory.labels) == {"a": "b"}


def test_list_pages_are_stable_and_filter_by_fingerprint(memory_service):
    stub = memory_service.stub()
    lay = h.layout(1, 1, 4, FLOAT32)
    for i in range(23):
        stub.CreateMemory(
            pb.CreateMemoryRequest(memory_id=f"m{i:02d}", layout=lay, model_fingerprint="A" if i % 3 else "B"),
            timeout=10,
        )

    def all_pages(fp, size, mutate=None):
        seen, token, pages = [], "", 0
        while True:
            r = stub.ListMemories(
                pb.ListMemoriesRequest(model_fingerprint=fp, page_size=size, page_token=token), timeout=10
            )
            assert len(r.memories) <= size
            seen += [m.memory_id for m in r.memories]
            pages += 1
            if mutate and pages == 1:
                mutate()
            token = r.next_page_token
            if not token:
                return seen, pages

    names, pages = all_pages("", 5)
    assert names == [f"m{i:02d}" for i in range(23)] and pages == 5
    b_names, _ = all_pages("B", 3)
    assert b_names == [f"m{i:02d}" for i in range(0, 23, 3)]
    assert all(
        m.model_fingerprint == "A"
        for m in stub.ListMemories(pb.ListMemoriesRequest(model_fingerprint="A", page_size=1000), timeout=10).memories
    )

    # Deleting a listed memory and adding one before the cursor between pages skips nothing else.
    def mutate():
        stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="m02"), timeout=10)
        stub.CreateMemory(pb.CreateMemoryRequest(memory_id="a-first", layout=lay, model_fingerprint="A"), timeout=10)

    names, _ = all_pages("", 5, mutate)
    assert names == [f"m{i:02d}" for i in range(23)]  # first page was read before the mutation
    names, _ = all_pages("", 5)
    assert names == ["a-first"] + [f"m{i:02d}" for i in range(23) if i != 2]
    assert len(stub.ListMemories(pb.ListMemoriesRequest(), timeout=10).memories) == 23  # default page 100


def test_delete_while_building_and_concurrent_streams(memory_service):
    stub = memory_service.stub()
    rng = np.random.default_rng(4)
    K, V = h.random_kv(rng, 2, 1, 8, 4, FLOAT32)
    h.create(stub, "b", K, FLOAT32)
    stub.AppendMemory(h.append_messages("b", K[:1], V[:1], FLOAT32), timeout=10)
    stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="b"), timeout=10)
    assert (
        code_of(lambda: stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="b"), timeout=10)).code
        == grpc.StatusCode.NOT_FOUND
    )

    # Two streams on one memory at once: the second is refused, the first completes.
    h.create(stub, "c", K, FLOAT32)
    held = h.HeldAppend(stub, "c", K, V, FLOAT32)
    assert (
        code_of(lambda: stub.AppendMemory(h.append_messages("c", K, V, FLOAT32, layer_order=[1]), timeout=10)).code
        == grpc.StatusCode.FAILED_PRECONDITION
    )
    held.release()
    assert held.result().state == READY


def test_search_with_create_times_refuses_a_memory_created_again(memory_service):
    stub = memory_service.stub()
    rng = np.random.default_rng(11)
    K, V = h.random_kv(rng, 1, 1, 6, 8, FLOAT32)
    h.build(stub, "again", K, V, FLOAT32)
    first = stub.GetMemory(pb.GetMemoryRequest(memory_id="again"), timeout=10).memory.create_time
    Q = rng.standard_normal((1, 1, 8)).astype(np.float32)

    def search(create_times):
        req = pb.SearchMemoryRequest(
            memory_ids=["again"], layer=0, queries=encode(Q, dtype=FLOAT32), top_k=2, create_times=create_times
        )
        return stub.SearchMemory(req, timeout=10)

    assert search([first]).indices.shape == search([]).indices.shape  # as resolved: answered
    stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="again"), timeout=10)
    h.build(stub, "again", K, V, FLOAT32)  # same rows, new memory
    e = code_of(lambda: search([first]))
    assert e.code == grpc.StatusCode.FAILED_PRECONDITION and "created again" in e.details
    e = code_of(lambda: search([first, first]))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "one per memory" in e.details


def _poisoned(a: np.ndarray, dtype, where: tuple, bad: float) -> pb.Tensor:
    """``a`` (float32 [heads, rows, dim]) encoded in ``dtype`` with ``bad`` at ``where``."""
    a = a.copy()
    a[where] = bad
    return encode(a, dtype=dtype)


@pytest.mark.parametrize("dtype", [FLOAT32, FLOAT16, BFLOAT16], ids=["f32", "f16", "bf16"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("tensor", ["values", "keys"])
def test_non_finite_rows_are_refused_naming_where_and_nothing_stays(memory_service, dtype, bad, tensor):
    """NaN / +-inf in values (a retrieved row would turn the attention output NaN) or keys (every
    cosine against them NaN): INVALID_ARGUMENT naming the layer, head and row, after good batches
    that the refusal rolls back; the service keeps serving and the memory is built afterwards."""
    stub = memory_service.stub()
    rng = np.random.default_rng(21)
    K = rng.standard_normal((2, 2, 10, 8)).astype(np.float32)
    V = rng.standard_normal((2, 2, 10, 8)).astype(np.float32)
    mid = f"poison-{tensor}-{dtype}-{bad}"
    h.create(stub, mid, K, dtype)
    good = list(h.append_messages(mid, K, V, dtype, chunk_rows=3))[:5]  # layer 0, then rows 0-2 of layer 1
    rows = {"keys": K[1][:, 3:6], "values": V[1][:, 3:6]}
    poisoned = pb.AppendMemoryRequest(
        layer=1,
        keys=encode(rows["keys"], dtype=dtype),
        values=encode(rows["values"], dtype=dtype),
    )
    getattr(poisoned, tensor).CopyFrom(_poisoned(rows[tensor], dtype, (1, 2, 5), bad))
    e = code_of(lambda: stub.AppendMemory(iter(good + [poisoned]), timeout=20))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT, e
    assert f"{tensor} of layer 1 hold NaN or infinite values" in e.details, e.details
    assert "head 1, row 2 of this message (row 5 of the layer), element 5" in e.details, e.details
    assert f"send finite {tensor}" in e.details and "Traceback" not in e.details
    got = stub.GetMemory(pb.GetMemoryRequest(memory_id=mid), timeout=10).memory
    assert got.state == BUILDING and got.bytes == 0
    assert list(stub.AppendMemory(iter([pb.AppendMemoryRequest(memory_id=mid)]), timeout=10).rows_per_layer) == [0, 0]
    assert stub.AppendMemory(h.append_messages(mid, K, V, dtype), timeout=20).state == READY
    fetched = h.fetch(stub, mid)
    for layer in range(2):
        assert np.array_equal(h.as_float32(fetched[layer][1], dtype), h.as_sent(V[layer], dtype))


def test_non_finite_values_after_flushed_batches_leave_nothing_in_redis(memory_service, redis_server):
    """A refused batch after rows already sent to Redis (more than one flush of
    ``limits.FLUSH_BYTES``): the stream's rows are rolled back there, no chunk key stays behind."""
    from services.memory import kv_store, limits
    from services.memory.kv_layout import key_prefix

    stub = memory_service.stub()
    rng = np.random.default_rng(22)
    K, V = h.random_kv(rng, 2, 8, 4096, 128, FLOAT16)  # 16 MiB of keys + values per layer
    assert K[0].nbytes + V[0].nbytes >= limits.FLUSH_BYTES  # layer 0 is in flight before layer 1 comes
    h.create(stub, "poison-big", K, FLOAT16)
    good = list(h.append_messages("poison-big", K, V, FLOAT16, chunk_rows=1024))
    bad_values = V[1][:, :1024].copy()
    bad_values[7, 1000, 100] = np.inf
    poisoned = pb.AppendMemoryRequest(layer=1, keys=encode(K[1][:, :1024]), values=encode(bad_values))
    e = code_of(lambda: stub.AppendMemory(iter(good[:4] + [poisoned] + good[5:]), timeout=60))
    assert e.code == grpc.StatusCode.INVALID_ARGUMENT and "head 7, row 1000" in e.details, e
    r = kv_store.sync_client(redis_server.url)
    try:
        left = sorted(k.decode() for k in r.scan_iter(match=key_prefix("poison-big") + ":*"))
        prefix = key_prefix("poison-big")
        assert left == [f"{prefix}:meta", f"{prefix}:tokens"], left  # no chunk, no chunk list
        meta = r.hgetall(f"{prefix}:meta")
        counters = {k: v for k, v in meta.items() if k.startswith((b"r:", b"c:"))}
        assert b"r:0" in counters, meta  # layer 0 reached Redis before the refusal: it was rolled back
        assert set(counters.values()) == {b"0"} and meta[b"bytes"] == b"0", meta
    finally:
        r.close()
    got = stub.GetMemory(pb.GetMemoryRequest(memory_id="poison-big"), timeout=10).memory
    assert got.state == BUILDING and got.bytes == 0
    assert stub.AppendMemory(iter(good), timeout=60).state == READY


def test_fetch_names_the_create_time_of_the_rows_it_sends(memory_service):
    """Every FetchMemory message carries the memory's create_time (GetMemory's), so a memory
    deleted and created again with exactly the same rows is told apart from the first."""
    from extmind import row_wire

    stub = memory_service.stub()
    rng = np.random.default_rng(12)
    K, V = h.random_kv(rng, 2, 2, 300, 64, FLOAT16)

    def fetched_create_times(mid):
        got = stub.GetMemory(pb.GetMemoryRequest(memory_id=mid), timeout=10).memory.create_time
        messages = list(stub.FetchMemory(pb.FetchMemoryRequest(memory_id=mid), timeout=10))
        raw = memory_service.channel().unary_stream(
            "/extmind.v1.MemoryService/FetchMemory",
            request_serializer=pb.FetchMemoryRequest.SerializeToString,
            response_deserializer=row_wire.read_fetch_response,
        )
        read = list(raw(pb.FetchMemoryRequest(memory_id=mid), timeout=10))  # as the generator reads them
        assert len(messages) == len(read) == 2
        assert all(m.HasField("create_time") and m.create_time == got for m in messages)
        assert all(isinstance(r, row_wire.FetchedSlice) and r.create_time == got for r in read)
        return got

    h.build(stub, "incarnation", K, V, FLOAT16)
    first = fetched_create_times("incarnation")
    stub.DeleteMemory(pb.DeleteMemoryRequest(memory_id="incarnation"), timeout=10)
    h.build(stub, "incarnation", K, V, FLOAT16)  # same id, same rows, a new memory
    assert fetched_create_times("incarnation") != first
