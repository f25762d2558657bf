"""The bad-input table: every bad request gets its status code and a message for a person, and
the service keeps serving (a good call works after each bad one)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from extmind.tensor import BFLOAT16, FLOAT16, FLOAT32, INT32, encode
from extmind.v1 import common_pb2
from extmind.v1 import memory_pb2 as pb
from tests.helpers import pb_len_field as _field
from tests.helpers import pb_tensor
from tests.helpers import pb_varint as _varint
from tests.memory import helpers as h

C = grpc.StatusCode
RNG = np.random.default_rng(0)
K, V = h.random_kv(RNG, 2, 2, 10, 8, FLOAT16)
K2, V2 = h.random_kv(RNG, 2, 2, 10, 16, FLOAT16)
Q = RNG.standard_normal((4, 1, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def svc(module_memory_service):
    s = module_memory_service
    stub = s.stub()
    h.build(stub, "good", K, V, FLOAT16)
    h.build(stub, "other-model", K, V, FLOAT16, fingerprint="fp-other")
    h.build(stub, "other-layout", K2, V2, FLOAT16)
    h.build(stub, "f32", K.astype(np.float32), V.astype(np.float32), FLOAT32)
    h.create(stub, "building", K, FLOAT16)
    return s


def search_req(**kw):
    base = dict(memory_ids=["good"], layer=0, queries=encode(Q), top_k=3)
    base.update(kw)
    return pb.SearchMemoryRequest(**base)


def tensor(a, dtype=None, *, cut=0, shape=None):
    t = encode(a, dtype=dtype)
    if cut:
        t.data = t.data[:-cut]
    if shape is not None:
        del t.shape[:]
        t.shape.extend(shape)
    return t


def append(layer=0, keys=None, values=None, memory_id="building"):
    return pb.AppendMemoryRequest(
        memory_id=memory_id,
        layer=layer,
        keys=keys if keys is not None else encode(K[0][:, :2]),
        values=values if values is not None else encode(V[0][:, :2]),
    )


LAYOUT = h.layout(2, 2, 8, FLOAT16)

# (case, rpc, request or list of stream messages, expected code)
TABLE = [
    # --- SearchMemory
    ("search truncated query bytes", "SearchMemory", search_req(queries=tensor(Q, cut=1)), C.INVALID_ARGUMENT),
    ("search query shape vs bytes", "SearchMemory", search_req(queries=tensor(Q, shape=[4, 2, 8])), C.INVALID_ARGUMENT),
    ("search query 2-D", "SearchMemory", search_req(queries=encode(Q[0])), C.INVALID_ARGUMENT),
    (
        "search query int dtype",
        "SearchMemory",
        search_req(queries=encode(np.ones((4, 1, 8), np.int32))),
        C.INVALID_ARGUMENT,
    ),
    (
        "search query dtype unspecified",
        "SearchMemory",
        search_req(queries=common_pb2.Tensor(dtype=0, shape=[4, 1, 8], data=Q.tobytes())),
        C.INVALID_ARGUMENT,
    ),
    (
        "search missing queries",
        "SearchMemory",
        pb.SearchMemoryRequest(memory_ids=["good"], top_k=3),
        C.INVALID_ARGUMENT,
    ),
    (
        "search wrong head_dim",
        "SearchMemory",
        search_req(queries=encode(np.ones((4, 1, 16), np.float32))),
        C.INVALID_ARGUMENT,
    ),
    (
        "search heads not a multiple",
        "SearchMemory",
        search_req(queries=encode(np.ones((3, 1, 8), np.float32))),
        C.INVALID_ARGUMENT,
    ),
    (
        "search empty queries (q=0)",
        "SearchMemory",
        search_req(queries=encode(np.ones((4, 0, 8), np.float32))),
        C.INVALID_ARGUMENT,
    ),
    (
        "search zero heads",
        "SearchMemory",
        search_req(queries=encode(np.ones((0, 1, 8), np.float32))),
        C.INVALID_ARGUMENT,
    ),
    (
        "search NaN query",
        "SearchMemory",
        search_req(queries=encode(np.full((4, 1, 8), np.nan, np.float32))),
        C.INVALID_ARGUMENT,
    ),
    ("search layer out of range", "SearchMemory", search_req(layer=2), C.INVALID_ARGUMENT),
    ("search unknown id", "SearchMemory", search_req(memory_ids=["nope"]), C.NOT_FOUND),
    ("search bad id chars", "SearchMemory", search_req(memory_ids=["a{b}"]), C.INVALID_ARGUMENT),
    ("search no ids", "SearchMemory", search_req(memory_ids=[]), C.INVALID_ARGUMENT),
    ("search duplicate ids", "SearchMemory", search_req(memory_ids=["good", "good"]), C.INVALID_ARGUMENT),
    ("search mixed fingerprints", "SearchMemory", search_req(memory_ids=["good", "other-model"]), C.INVALID_ARGUMENT),
    ("search mixed layouts", "SearchMemory", search_req(memory_ids=["good", "other-layout"]), C.INVALID_ARGUMENT),
    ("search mixed dtypes", "SearchMemory", search_req(memory_ids=["good", "f32"]), C.INVALID_ARGUMENT),
    ("search not READY", "SearchMemory", search_req(memory_ids=["building"]), C.FAILED_PRECONDITION),
    ("search huge top_k", "SearchMemory", search_req(top_k=10**9), C.INVALID_ARGUMENT),
    ("search top_k 0", "SearchMemory", search_req(top_k=0), C.INVALID_ARGUMENT),
    ("search NaN threshold", "SearchMemory", search_req(sim_threshold=float("nan")), C.INVALID_ARGUMENT),
    (
        "search create_time nanos negative",
        "SearchMemory",
        search_req(create_times=[Timestamp(seconds=1, nanos=-1)]),
        C.INVALID_ARGUMENT,
    ),
    (
        "search answer too large",
        "SearchMemory",
        search_req(queries=encode(np.ones((4, 1_000_000, 8), np.float16)), top_k=10, return_vectors=True),
        C.INVALID_ARGUMENT,  # over the response budget: too large, not retryable
    ),
    # --- CreateMemory
    (  # the message names the id, shortened: a 100 000-character echo would overflow gRPC's trailers
        "create huge id",
        "CreateMemory",
        pb.CreateMemoryRequest(memory_id="x" * 100_000, layout=LAYOUT, model_fingerprint="fp"),
        C.INVALID_ARGUMENT,
    ),
    (
        "create negative token id",
        "CreateMemory",
        pb.CreateMemoryRequest(memory_id="neg", layout=LAYOUT, model_fingerprint="fp", token_ids=[3, -5, 7]),
        C.INVALID_ARGUMENT,
    ),
    (
        "create existing id",
        "CreateMemory",
        pb.CreateMemoryRequest(memory_id="good", layout=LAYOUT, model_fingerprint="fp"),
        C.ALREADY_EXISTS,
    ),
    (
        "create bad id",
        "CreateMemory",
        pb.CreateMemoryRequest(memory_id="has space", layout=LAYOUT, model_fingerprint="fp"),
        C.INVALID_ARGUMENT,
    ),
    (
        "create id too long",
        "CreateMemory",
        pb.CreateMemoryRequest(memory_id="x" * 129, layout=LAYOUT, model_fingerprint="fp"),
        C.INVALID_ARGUMENT,
    ),
    (
        "create no layout",
        "CreateMemory",
        pb.CreateMemoryRequest(memory_id="n1", model_fingerprint="fp"),
        C.INVALID_ARGUMENT,
    ),
    (
        "create head_dim 0",
        "CreateMemory",
        pb.CreateMemoryRequest(memory_id="n2", layout=h.layout(2, 2, 0, FLOAT16), model_fingerprint="fp"),
        C.INVALID_ARGUMENT,
    ),
    (
        "create int dtype",
        "CreateMemory",
        pb.CreateMemoryRequest(memory_id="n3", layout=h.layout(2, 2, 8, INT32), model_fingerprint="fp"),
        C.INVALID_ARGUMENT,
    ),
    (
        "create unknown dtype",
        "CreateMemory",
        pb.CreateMemoryRequest(memory_id="n4", layout=h.layout(2, 2, 8, 99), model_fingerprint="fp"),
        C.INVALID_ARGUMENT,
    ),
    (
        "create no fingerprint",
        "CreateMemory",
        pb.CreateMemoryRequest(memory_id="n5", layout=LAYOUT),
        C.INVALID_ARGUMENT,
    ),
    (
        "create positions mismatch",
        "CreateMemory",
        pb.CreateMemoryRequest(memory_id="n6", layout=LAYOUT, model_fingerprint="fp", token_ids=[1, 2], positions=[0]),
        C.INVALID_ARGUMENT,
    ),
    (  # a citation's end (last position + 1) would not fit a uint32
        "create position 2**32 - 1",
        "CreateMemory",
        pb.CreateMemoryRequest(
            memory_id="n6b", layout=LAYOUT, model_fingerprint="fp", token_ids=[1, 2], positions=[0, 2**32 - 1]
        ),
        C.INVALID_ARGUMENT,
    ),
    (
        "create positions not increasing",
        "CreateMemory",
        pb.CreateMemoryRequest(
            memory_id="n6c", layout=LAYOUT, model_fingerprint="fp", token_ids=[1, 2, 3], positions=[0, 4, 4]
        ),
        C.INVALID_ARGUMENT,
    ),
    # --- AppendMemory (streams)
    ("append truncated keys", "AppendMemory", [append(keys=tensor(K[0][:, :2], cut=2))], C.INVALID_ARGUMENT),
    (
        "append wrong dtype",
        "AppendMemory",
        [append(keys=encode(K[0][:, :2].astype(np.float32)), values=encode(V[0][:, :2].astype(np.float32)))],
        C.INVALID_ARGUMENT,
    ),
    (
        "append bf16 into f16",
        "AppendMemory",
        [
            append(
                keys=encode(K[0][:, :2].astype(np.float32), dtype=BFLOAT16),
                values=encode(V[0][:, :2].astype(np.float32), dtype=BFLOAT16),
            )
        ],
        C.INVALID_ARGUMENT,
    ),
    (
        "append wrong heads",
        "AppendMemory",
        [append(keys=encode(K[0][:1, :2]), values=encode(V[0][:1, :2]))],
        C.INVALID_ARGUMENT,
    ),
    (
        "append wrong head_dim",
        "AppendMemory",
        [append(keys=encode(K2[0][:, :2]), values=encode(V2[0][:, :2]))],
        C.INVALID_ARGUMENT,
    ),
    (
        "append 2-D keys",
        "AppendMemory",
        [append(keys=encode(K[0][0, :2]), values=encode(V[0][0, :2]))],
        C.INVALID_ARGUMENT,
    ),
    ("append keys/values rows differ", "AppendMemory", [append(values=encode(V[0][:, :3]))], C.INVALID_ARGUMENT),
    (
        "append keys only",
        "AppendMemory",
        [pb.AppendMemoryRequest(memory_id="building", keys=encode(K[0][:, :2]))],
        C.INVALID_ARGUMENT,
    ),
    (
        "append NaN keys",
        "AppendMemory",
        [append(keys=encode(np.full((2, 2, 8), np.nan, np.float16)))],
        C.INVALID_ARGUMENT,
    ),
    (
        "append NaN values",
        "AppendMemory",
        [append(values=encode(np.full((2, 2, 8), np.nan, np.float16)))],
        C.INVALID_ARGUMENT,
    ),
    (
        "append +inf values",
        "AppendMemory",
        [append(values=encode(np.full((2, 2, 8), np.inf, np.float16)))],
        C.INVALID_ARGUMENT,
    ),
    (
        "append -inf values after good rows",
        "AppendMemory",
        [append(), append(values=encode(np.full((2, 2, 8), -np.inf, np.float16)))],
        C.INVALID_ARGUMENT,
    ),
    ("append layer out of range", "AppendMemory", [append(layer=2)], C.INVALID_ARGUMENT),
    (
        "append too many rows",
        "AppendMemory",
        [append(keys=encode(np.ones((2, 11, 8), np.float16)), values=encode(np.ones((2, 11, 8), np.float16)))],
        C.INVALID_ARGUMENT,
    ),
    ("append unknown id", "AppendMemory", [append(memory_id="nope")], C.NOT_FOUND),
    ("append no id", "AppendMemory", [append(memory_id="")], C.INVALID_ARGUMENT),
    ("append two ids in a stream", "AppendMemory", [append(), append(memory_id="good")], C.INVALID_ARGUMENT),
    ("append empty stream", "AppendMemory", [], C.INVALID_ARGUMENT),
    ("append to READY", "AppendMemory", [append(memory_id="good")], C.FAILED_PRECONDITION),
    # --- Get / List / Delete / Fetch
    ("get unknown", "GetMemory", pb.GetMemoryRequest(memory_id="nope"), C.NOT_FOUND),
    ("get empty id", "GetMemory", pb.GetMemoryRequest(), C.INVALID_ARGUMENT),
    ("delete unknown", "DeleteMemory", pb.DeleteMemoryRequest(memory_id="nope"), C.NOT_FOUND),
    (
        "delete create_time nanos out of range",
        "DeleteMemory",
        pb.DeleteMemoryRequest(memory_id="good", create_time=Timestamp(seconds=1, nanos=1_000_000_000)),
        C.INVALID_ARGUMENT,
    ),
    (
        "delete create_time before 1970",
        "DeleteMemory",
        pb.DeleteMemoryRequest(memory_id="good", create_time=Timestamp(seconds=-1)),
        C.INVALID_ARGUMENT,
    ),
    (
        "delete another incarnation",
        "DeleteMemory",
        pb.DeleteMemoryRequest(memory_id="good", create_time=Timestamp(seconds=1)),
        C.FAILED_PRECONDITION,
    ),
    ("list garbage page token", "ListMemories", pb.ListMemoriesRequest(page_token="garbage"), C.INVALID_ARGUMENT),
    ("list forged page token", "ListMemories", pb.ListMemoriesRequest(page_token="m1.!!!"), C.INVALID_ARGUMENT),
    ("list token of another filter", "ListMemories", None, C.INVALID_ARGUMENT),  # built in the test
    ("fetch unknown", "FetchMemory", pb.FetchMemoryRequest(memory_id="nope"), C.NOT_FOUND),
    ("fetch not READY", "FetchMemory", pb.FetchMemoryRequest(memory_id="building"), C.FAILED_PRECONDITION),
    (
        "fetch layer out of range",
        "FetchMemory",
        pb.FetchMemoryRequest(memory_id="good", layers=[0, 5]),
        C.INVALID_ARGUMENT,
    ),
    (
        "fetch duplicate layers",
        "FetchMemory",
        pb.FetchMemoryRequest(memory_id="good", layers=[1, 1]),
        C.INVALID_ARGUMENT,
    ),
]


def call(stub, rpc, req):
    fn = getattr(stub, rpc)
    if rpc == "AppendMemory":
        return fn(iter(req), timeout=20)
    if rpc == "FetchMemory":
        return list(fn(req, timeout=20))
    return fn(req, timeout=20)


def good_call(stub):
    s = stub.SearchMemory(search_req(), timeout=10)
    assert s.indices.shape == [4, 1, 3]


@pytest.mark.parametrize("case,rpc,req,code", TABLE, ids=[t[0] for t in TABLE])
def test_bad_input_table(svc, case, rpc, req, code):
    stub = svc.stub()
    if case == "list token of another filter":
        for i in range(3):
            h.create(stub, f"lt{i}", K, FLOAT16, fingerprint="fp-list")
        token = stub.ListMemories(pb.ListMemoriesRequest(page_size=1), timeout=10).next_page_token
        assert token
        req = pb.ListMemoriesRequest(page_token=token, model_fingerprint="fp-list")
    with pytest.raises(grpc.RpcError) as e:
        call(stub, rpc, req)
    assert e.value.code() == code, (e.value.code(), e.value.details())
    details = e.value.details()
    assert details and 15 < len(details) <= 2000 and "Traceback" not in details
    good_call(stub)
    # A failed append changed nothing.
    m = stub.GetMemory(pb.GetMemoryRequest(memory_id="building"), timeout=10).memory
    assert m.state == pb.MEMORY_STATE_BUILDING and m.bytes == 0


def test_auth_on_and_off(memory_service_factory, memory_service):
    from extmind.procs import health_status
    from extmind.v1 import memory_pb2_grpc

    secured = memory_service_factory(env={"EXTMIND_AUTH_TOKEN": "s3cret"})
    req = pb.ListMemoriesRequest()
    with secured.channel() as ch:
        stub = memory_pb2_grpc.MemoryServiceStub(ch)
        for md in [(), (("authorization", "Bearer wrong"),), (("authorization", "s3cret"),)]:
            with pytest.raises(grpc.RpcError) as e:
                stub.ListMemories(req, timeout=10, metadata=md)
            assert e.value.code() == C.UNAUTHENTICATED and "Bearer" in e.value.details()
            with pytest.raises(grpc.RpcError) as e:  # streams too
                list(stub.FetchMemory(pb.FetchMemoryRequest(memory_id="x"), timeout=10, metadata=md))
            assert e.value.code() == C.UNAUTHENTICATED
        stub.ListMemories(req, timeout=10, metadata=(("authorization", "Bearer s3cret"),))
    assert health_status(secured.address, "extmind.v1.MemoryService") == 1  # probes need no token
    # Auth off: no token needed.
    memory_service.stub().ListMemories(req, timeout=10)


def test_raw_append_bytes_get_the_answer_protobuf_reading_gives(svc):
    """AppendMemory's requests are read by hand (extmind.row_wire): bytes a client's protobuf
    library may send (a dimension of -1 is a 10-byte varint, a uint32 past 32 bits keeps its
    low bits) get what the generated reader would answer, and a message protobuf refuses
    changes nothing."""
    raw = svc.channel().stream_unary(
        "/extmind.v1.MemoryService/AppendMemory",
        request_serializer=lambda b: b,
        response_deserializer=pb.AppendMemoryResponse.FromString,
    )

    def rows(dims, data: bytes) -> bytes:
        return pb_tensor(FLOAT16, dims, data)

    k, v = K[0][:, :2], V[0][:, :2]
    negative = (
        _field(1, b"building") + _field(3, rows([2, 2**64 - 1, 8], b"")) + _field(4, rows([2, 2**64 - 1, 8], b""))
    )
    with pytest.raises(grpc.RpcError) as e:
        raw(iter([negative]), timeout=20)
    assert e.value.code() == C.INVALID_ARGUMENT and "negative dimension" in e.value.details()
    cut_short = _field(1, b"building") + _field(3, rows([2, 2, 8], k.tobytes())) + _varint(9 << 3 | 1) + b"\0\0"
    with pytest.raises(grpc.RpcError):
        raw(iter([cut_short]), timeout=20)
    m = svc.stub().GetMemory(pb.GetMemoryRequest(memory_id="building"), timeout=10).memory
    assert m.state == pb.MEMORY_STATE_BUILDING and m.bytes == 0
    h.create(svc.stub(), "raw-layer", K[:, :, :2], FLOAT16)
    layer_past_32_bits = (
        _field(1, b"raw-layer") + b"\x10" + _varint(2**32 + 1) + _field(3, rows([2, 2, 8], K[1][:, :2].tobytes()))
    )
    layer_past_32_bits += _field(4, rows([2, 2, 8], V[1][:, :2].tobytes()))
    first = _field(1, b"raw-layer") + _field(3, rows([2, 2, 8], k.tobytes())) + _field(4, rows([2, 2, 8], v.tobytes()))
    done = raw(iter([first, layer_past_32_bits]), timeout=20)
    assert done.state == pb.MEMORY_STATE_READY and list(done.rows_per_layer) == [2, 2]
    got = h.fetch(svc.stub(), "raw-layer")
    assert np.array_equal(got[1][0], K[1][:, :2]) and np.array_equal(got[1][1], V[1][:, :2])


@pytest.mark.parametrize(
    "method, streaming",
    [("/extmind.v1.MemoryService/GetMemory", False), ("/extmind.v1.MemoryService/FetchMemory", True)],
)
@pytest.mark.parametrize("body", [b"\xff\xff\xff\xff", b"\x0a\x05ab"], ids=["bad_tag", "truncated_string"])
def test_a_unary_request_that_does_not_parse_is_invalid_argument(svc, method, streaming, body):
    """gRPC parses a unary request before any handler runs (it answered UNKNOWN); the service
    parses it inside its error mapping, so bytes that are not the method's message are the
    caller's fault, as in a streamed request. The service stays up."""
    with grpc.insecure_channel(svc.address) as channel:
        kind = channel.unary_stream if streaming else channel.unary_unary
        call = kind(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as e:
            out = call(body, timeout=10)
            if streaming:
                list(out)
    assert e.value.code() == C.INVALID_ARGUMENT and "could not be parsed" in e.value.details(), e.value.details()
    assert svc.stub().GetMemory(pb.GetMemoryRequest(memory_id="good"), timeout=10).memory.memory_id == "good"
