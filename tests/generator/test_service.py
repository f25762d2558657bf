"""``python -m services.generator`` as a process, over real gRPC, with a real memory service."""

from __future__ import annotations

import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from extmind.procs import health_status
from extmind.v1 import generator_pb2 as g
from extmind.v1 import generator_pb2_grpc

from .helpers import start_generator


@pytest.fixture(scope="module")
def services(tmp_path_factory, llama_path, module_memory_service):
    d = tmp_path_factory.mktemp("gensvc")
    mem = module_memory_service
    gen = start_generator(d / "logs", llama_path, mem.address)
    yield gen, mem
    gen.stop()


@pytest.fixture(scope="module")
def stub(services):
    ch = services[0].channel()
    yield generator_pb2_grpc.GeneratorServiceStub(ch)
    ch.close()


def test_info_memorize_generate_stream(stub, services):
    info = stub.GetInfo(g.GeneratorServiceGetInfoRequest(), timeout=10)
    assert info.num_layers == 2 and info.num_attention_heads == 4 and info.num_kv_heads == 2 and info.head_dim == 16
    assert info.model_fingerprint.startswith("sha256:")
    m = stub.Memorize(
        g.MemorizeRequest(text="Paris is the capital of France. Alice met Bob at the station.", labels={"src": "test"}),
        timeout=60,
    )
    assert m.num_rows == m.num_tokens - 1 and m.model_fingerprint == info.model_fingerprint
    em = g.ExtendedMind(memory_ids=[m.memory_id], top_k=3, return_citations=True)
    req = dict(
        prompt="The capital of France is",
        sampling=g.SamplingParams(max_tokens=8),
        extended_mind=em,
        return_logprobs=True,
    )
    r = stub.Generate(g.GenerateRequest(**req), timeout=60)
    assert len(r.token_ids) == len(r.logprobs) <= 8 and r.usage.prompt_tokens > 0
    assert r.finish_reason in (g.FINISH_REASON_LENGTH, g.FINISH_REASON_STOP)
    assert r.citations and r.citations[0].memory_id == m.memory_id and r.citations[0].hits > 0
    parts = list(stub.GenerateStream(g.GenerateStreamRequest(**req), timeout=60))
    assert [t for p in parts for t in p.token_ids] == list(r.token_ids)
    assert "".join(p.text for p in parts) == r.text
    assert parts[-1].finish_reason == r.finish_reason and list(parts[-1].citations) == list(r.citations)
    # citation_min_weight only filters what is counted: the same tokens whatever the floor, and
    # fewer hits the higher it is (0 set = every pick; unset = the default 0.02), streamed too.
    hits = []
    for floor in (0.0, None, 0.3, 1.0):
        fem = g.ExtendedMind(memory_ids=[m.memory_id], top_k=3, return_citations=True, max_citations=1000)
        if floor is not None:
            fem.citation_min_weight = floor
        last = list(stub.GenerateStream(g.GenerateStreamRequest(**dict(req, extended_mind=fem)), timeout=60))
        assert [t for p in last for t in p.token_ids] == list(r.token_ids)
        hits.append(sum(c.hits for c in last[-1].citations))
    assert hits == sorted(hits, reverse=True) and hits[0] > 0, hits
    assert hits[1] > hits[2], hits  # a floor that is set is applied (here 25 hits at 0.02, none at 0.3)
    # An ExtendedMind without memories (valid fields, now checked) generates as a plain request
    # does: the same greedy tokens, no citations, unary and streamed.
    plain = stub.Generate(g.GenerateRequest(prompt=req["prompt"], sampling=req["sampling"]), timeout=60)
    for bare in (
        g.ExtendedMind(),
        g.ExtendedMind(top_k=5, return_citations=True, citation_min_weight=0.5, layers=[1], sim_threshold=0.2),
        g.ExtendedMind(mode=g.RETRIEVAL_MODE_REMOTE, top_k=0, max_citations=3),
    ):
        kw = dict(prompt=req["prompt"], sampling=req["sampling"], extended_mind=bare)
        got = stub.Generate(g.GenerateRequest(**kw), timeout=60)
        assert list(got.token_ids) == list(plain.token_ids) and not got.citations
        streamed = list(stub.GenerateStream(g.GenerateStreamRequest(**kw), timeout=60))
        assert [t for p in streamed for t in p.token_ids] == list(plain.token_ids) and not streamed[-1].citations
    chat = stub.Generate(
        g.GenerateRequest(
            messages=[g.ChatMessage(role="user", content="Hello")], sampling=g.SamplingParams(max_tokens=3)
        ),
        timeout=60,
    )
    assert chat.usage.prompt_tokens > 3


@pytest.mark.parametrize(
    "request_kw,code",
    [
        (dict(), grpc.StatusCode.INVALID_ARGUMENT),  # empty prompt
        (dict(prompt="hi", sampling=g.SamplingParams(temperature=-1)), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="hi", sampling=g.SamplingParams(top_p=2)), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="hi", prompt_token_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt_token_ids=[10**7]), grpc.StatusCode.INVALID_ARGUMENT),
        (dict(prompt="hi", extended_mind=g.ExtendedMind(memory_ids=["nope"])), grpc.StatusCode.NOT_FOUND),
        (
            dict(prompt="hi", extended_mind=g.ExtendedMind(memory_ids=["x"], layers=[9])),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            dict(prompt="hi", extended_mind=g.ExtendedMind(memory_ids=["x"], citation_min_weight=1.5)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (  # checked without memories too, as the HTTP face does
            dict(prompt="hi", extended_mind=g.ExtendedMind(citation_min_weight=1.5)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (dict(prompt="hi", extended_mind=g.ExtendedMind(layers=[9])), grpc.StatusCode.INVALID_ARGUMENT),
        (
            dict(prompt="hi", extended_mind=g.ExtendedMind(memory_ids=["x"], citation_min_weight=float("nan"))),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
    ],
)
def test_errors_have_the_right_codes_and_the_service_keeps_serving(stub, request_kw, code):
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(g.GenerateRequest(**request_kw), timeout=30)
    assert e.value.code() == code, e.value.details()
    assert e.value.details()
    r = stub.Generate(g.GenerateRequest(prompt="hi", sampling=g.SamplingParams(max_tokens=2)), timeout=30)
    assert len(r.token_ids) == 2


def test_memorize_errors(stub):
    with pytest.raises(grpc.RpcError) as e:
        stub.Memorize(g.MemorizeRequest(), timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    stub.Memorize(g.MemorizeRequest(text="Rome is the capital of Italy.", memory_id="dup"), timeout=30)
    with pytest.raises(grpc.RpcError) as e:
        stub.Memorize(g.MemorizeRequest(text="Rome is the capital of Italy.", memory_id="dup"), timeout=30)
    assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_deadline_and_cancel_free_the_slot(stub, services):
    with pytest.raises(grpc.RpcError) as e:
        stub.Generate(g.GenerateRequest(prompt="The sea", sampling=g.SamplingParams(max_tokens=100_000)), timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    call = stub.GenerateStream(
        g.GenerateStreamRequest(prompt="The sea", sampling=g.SamplingParams(max_tokens=100_000)), timeout=60
    )
    next(call)
    call.cancel()
    # The slot count itself is checked in test_engine.py::test_cancellation_frees_the_slot; here
    # the service keeps answering after a deadline and a cancel.
    t0 = time.monotonic()
    r = stub.Generate(g.GenerateRequest(prompt="hi", sampling=g.SamplingParams(max_tokens=4)), timeout=20)
    assert len(r.token_ids) == 4 and time.monotonic() - t0 < 20
    assert health_status(services[0].address, "extmind.v1.GeneratorService") == health_pb2.HealthCheckResponse.SERVING
