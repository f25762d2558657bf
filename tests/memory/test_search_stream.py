"""SearchMemoryStream: many searches on one stream answer exactly as SearchMemory does, in order;
a bad request ends the stream with SearchMemory's status and the service stays up; a client that
goes away cancels the stream on the server."""

from __future__ import annotations

import queue

import grpc
import numpy as np
import pytest

from extmind.tensor import BFLOAT16, FLOAT16, FLOAT32, encode
from extmind.v1 import memory_pb2 as pb
from tests.memory import helpers as h

from ..helpers import access_lines, wait_for_access_line

STREAM = "/extmind.v1.MemoryService/SearchMemoryStream"


@pytest.fixture(scope="module")
def svc(module_memory_service):
    return module_memory_service


@pytest.fixture(scope="module")
def memories(svc):
    """Two float16 memories of one model (2 layers, 2 KV heads, head_dim 16) and a bfloat16 one."""
    rng = np.random.default_rng(7)
    stub = svc.stub()
    out = {}
    for mid, rows, dtype in (("st-a", 120, FLOAT16), ("st-b", 45, FLOAT16), ("st-c", 80, BFLOAT16)):
        K, V = h.random_kv(rng, 2, 2, rows, 16, dtype)
        h.build(stub, mid, K, V, dtype, fingerprint=f"fp-{dtype}")
        out[mid] = (K, V)
    return out


def _request(rng, ids, layer, H=4, q=1, top_k=8, threshold=None, qdtype=FLOAT32) -> pb.SearchMemoryRequest:
    Q = rng.standard_normal((H, q, 16)).astype(np.float32)
    req = pb.SearchMemoryRequest(
        memory_ids=ids, layer=layer, queries=encode(Q, dtype=qdtype), top_k=top_k, return_vectors=True
    )
    if threshold is not None:
        req.sim_threshold = threshold
    return req


class Stream:
    """A SearchMemoryStream call fed from a queue: ``send`` a request, ``answer`` the next one."""

    def __init__(self, stub):
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self.call = stub.SearchMemoryStream(iter(self._q.get, None), timeout=60)

    def send(self, req) -> None:
        self._q.put(req if isinstance(req, pb.SearchMemoryStreamRequest) else pb.SearchMemoryStreamRequest(search=req))

    def answer(self) -> pb.SearchMemoryResponse:
        return next(self.call).result

    def close(self) -> None:
        """Half-closes the stream and waits for the server to end it (its access line is written)."""
        self._q.put(None)
        assert list(self.call) == []


def test_every_answer_equals_unarys_in_order(svc, memories):
    rng = np.random.default_rng(1)
    stub = svc.stub()
    reqs = [
        _request(rng, ["st-a"], 0),
        _request(rng, ["st-a", "st-b"], 1, H=8, q=3, top_k=20),  # several memories, GQA 4 over 2
        _request(rng, ["st-b"], 0, top_k=100),  # top_k > rows
        _request(rng, ["st-a"], 1, q=2, threshold=0.5),  # masked hits
        _request(rng, ["st-c"], 1, H=2, q=5, qdtype=BFLOAT16),  # a bfloat16 memory, bfloat16 queries
        _request(rng, ["st-a", "st-b"], 0, q=4, top_k=5, qdtype=FLOAT16),
    ]
    want = [stub.SearchMemory(r, timeout=30) for r in reqs]
    s = Stream(stub)
    for r in reqs:  # all sent before any answer is read: answered in order all the same
        s.send(r)
    got = [s.answer() for _ in reqs]
    s.close()
    assert list(s.call) == []  # the server ends the stream once the client half-closes it
    assert s.call.code() == grpc.StatusCode.OK
    for g, w in zip(got, want):
        assert g == w  # byte for byte: scores, indices, keys and values in the memory's dtype
    assert got[3].indices.data != want[0].indices.data  # the answers are not all alike
    assert -1 in np.frombuffer(got[3].indices.data, "<i8")  # the threshold did mask some hits


def test_a_stream_survives_many_layers_and_steps_in_one_call(svc, memories):
    """A decode's pattern: a search per layer per step, each sent after the last answer."""
    rng = np.random.default_rng(2)
    stub = svc.stub()
    before = len(access_lines(svc, STREAM))
    unary_before = len(access_lines(svc, "/extmind.v1.MemoryService/SearchMemory"))
    s = Stream(stub)
    n = 300
    reqs = [_request(rng, ["st-a", "st-b"], i % 2, H=4, q=1, top_k=10) for i in range(n)]
    got = []
    for r in reqs:
        s.send(r)
        got.append(s.answer())
    s.close()
    line = wait_for_access_line(svc, STREAM, before)
    assert "code=OK" in line and f"searches={n}" in line, line  # one access line for the whole stream
    assert len(access_lines(svc, "/extmind.v1.MemoryService/SearchMemory")) == unary_before
    for i in (0, 1, 137, n - 1):
        assert got[i] == stub.SearchMemory(reqs[i], timeout=30)


@pytest.mark.parametrize(
    "bad,code,words",
    [
        (pb.SearchMemoryStreamRequest(), grpc.StatusCode.INVALID_ARGUMENT, "request 2 of the stream has no search"),
        ("missing", grpc.StatusCode.NOT_FOUND, "request 2 of the stream: memory 'st-nope'"),
        ("top_k", grpc.StatusCode.INVALID_ARGUMENT, "request 2 of the stream: top_k is 0"),
        ("layer", grpc.StatusCode.INVALID_ARGUMENT, "request 2 of the stream: layer 7 is out of range"),
        ("models", grpc.StatusCode.INVALID_ARGUMENT, "come from different models"),
        ("queries", grpc.StatusCode.INVALID_ARGUMENT, "queries.data has"),
    ],
)
def test_a_bad_request_ends_the_stream_with_its_status_and_the_service_stays_up(svc, memories, bad, code, words):
    rng = np.random.default_rng(3)
    stub = svc.stub()
    good = _request(rng, ["st-a"], 0)
    if bad == "missing":
        bad = _request(rng, ["st-nope"], 0)
    elif bad == "top_k":
        bad = _request(rng, ["st-a"], 0, top_k=0)
    elif bad == "layer":
        bad = _request(rng, ["st-a"], 7)
    elif bad == "models":
        bad = _request(rng, ["st-a", "st-c"], 0)
    elif bad == "queries":
        bad = _request(rng, ["st-a"], 0)
        bad.queries.data = bad.queries.data[:-4]
    s = Stream(stub)
    for r in (good, good, bad, good):
        s.send(r)
    want = stub.SearchMemory(good, timeout=30)
    assert s.answer() == want and s.answer() == want
    with pytest.raises(grpc.RpcError) as e:
        s.answer()
    assert e.value.code() == code and words in e.value.details(), e.value.details()
    # the service is up: a new stream and a unary call both answer
    s2 = Stream(stub)
    s2.send(good)
    assert s2.answer() == want
    s2.close()
    assert stub.SearchMemory(good, timeout=30) == want


def test_a_client_that_goes_away_cancels_the_stream_on_the_server(svc, memories):
    rng = np.random.default_rng(4)
    stub = svc.stub()
    before = len(access_lines(svc, STREAM))
    s = Stream(stub)
    for _ in range(3):
        s.send(_request(rng, ["st-a"], 1))
        s.answer()
    s.call.cancel()  # as a client process that dies, or a generation that is abandoned
    line = wait_for_access_line(svc, STREAM, before)
    assert "code=CANCELLED" in line and "searches=3" in line, line
    s2 = Stream(stub)
    s2.send(_request(rng, ["st-b"], 0))
    assert s2.answer().indices.shape == [4, 1, 8]
    s2.close()


def test_a_corrupt_message_mid_stream_is_invalid_argument_not_internal(svc, memories):
    """Bytes that are not a SearchMemoryStreamRequest, after a good one: the client's fault
    (INVALID_ARGUMENT), not an internal error logged with its traceback; the service stays up."""
    rng = np.random.default_rng(5)
    before = len(access_lines(svc, STREAM))
    channel = grpc.insecure_channel(svc.address)
    raw = channel.stream_stream(
        STREAM, request_serializer=lambda b: b, response_deserializer=pb.SearchMemoryStreamResponse.FromString
    )
    q: queue.SimpleQueue = queue.SimpleQueue()
    call = raw(iter(q.get, None), timeout=60)
    q.put(pb.SearchMemoryStreamRequest(search=_request(rng, ["st-a"], 0)).SerializeToString())
    assert next(call).result.indices.shape == [4, 1, 8]
    q.put(b"\xff\xff\xff\xff")
    with pytest.raises(grpc.RpcError) as e:
        next(call)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "could not be parsed" in e.value.details()
    line = wait_for_access_line(svc, STREAM, before)
    assert "code=INVALID_ARGUMENT" in line and "searches=1" in line, line
    channel.close()
    s = Stream(svc.stub())
    s.send(_request(rng, ["st-b"], 1))
    assert s.answer().indices.shape == [4, 1, 8]
    s.close()


def test_every_client_that_goes_away_is_logged_cancelled(svc, memories):
    """gRPC's cancellation may land a few milliseconds after the requests end: each of many
    cancelled streams is still logged CANCELLED, never OK (it was ~1 in 6 on a busy machine)."""
    rng = np.random.default_rng(6)
    before = len(access_lines(svc, STREAM))
    n = 20
    for _ in range(n):
        s = Stream(svc.stub())
        s.send(_request(rng, ["st-a"], 0))
        s.answer()
        s.call.cancel()
    wait_for_access_line(svc, STREAM, before + n - 1)
    codes = [line.split("code=", 1)[1].split()[0] for line in access_lines(svc, STREAM)[before:]]
    assert codes == ["CANCELLED"] * n, codes
