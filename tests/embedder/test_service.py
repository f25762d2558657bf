"""The embedder over real gRPC (in-process server on a free port): RPCs, health, streaming
order, dynamic batching, and the bad-input table -- the service keeps serving after each."""

from __future__ import annotations

import asyncio
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extmind import tensor
from extmind.v1 import embedder_pb2 as pb
from extmind.v1 import embedder_pb2_grpc

TEXTS = [
    "Paris is the capital of France.",
    "Alice met Bob at the station at noon.",
    "42",
    "The river flows to the sea, and the sea rises into clouds.",
]


@pytest.fixture
async def service(start_app, tiny_qwen3, tiny_bert, tiny_reranker):
    app = await start_app(
        "--model",
        str(tiny_qwen3),
        "--model",
        str(tiny_bert),
        "--reranker",
        str(tiny_reranker),
        "--max-input-tokens",
        "24",
        "--max-queue",
        "6",
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}")
    yield app, embedder_pb2_grpc.EmbedderServiceStub(channel), channel
    await channel.close()


async def test_embed_info_tokenize_health(service, tiny_qwen3):
    app, stub, channel = service
    health = await health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service="extmind.v1.EmbedderService")
    )
    assert health.status == health_pb2.HealthCheckResponse.SERVING

    r = await stub.Embed(pb.EmbedRequest(inputs=TEXTS), timeout=30)
    v = tensor.decode(r.embeddings)
    assert r.model == "Qwen3-Embedding-tiny" and r.dimensions == 64 and v.shape == (4, 64)
    assert np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    assert len(r.token_counts) == 4 and all(c > 0 for c in r.token_counts)

    b = await stub.Embed(pb.EmbedRequest(inputs=TEXTS[:2], model="bert-tiny", normalize=False), timeout=30)
    assert b.model == "bert-tiny" and tensor.decode(b.embeddings).shape == (2, 64)

    info = await stub.GetInfo(pb.EmbedderServiceGetInfoRequest())
    assert info.default_model == "Qwen3-Embedding-tiny"
    kinds = {m.name: m.kind for m in info.models}
    assert kinds == {
        "Qwen3-Embedding-tiny": pb.MODEL_KIND_EMBEDDING,
        "bert-tiny": pb.MODEL_KIND_EMBEDDING,
        "Qwen3-Reranker-tiny": pb.MODEL_KIND_RERANKER,
    }
    qwen = next(m for m in info.models if m.name == "Qwen3-Embedding-tiny")
    assert (qwen.dimensions, qwen.min_dimensions, qwen.max_input_tokens) == (64, 32, 24)
    assert info.batching.max_queue == 6

    t = await stub.Tokenize(pb.TokenizeRequest(inputs=["hello world"]))
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny_qwen3 / "tokenizer.json"))
    assert list(t.results[0].token_ids) == tok.encode("hello world").ids + [tok.token_to_id("<|endoftext|>")]

    rr = await stub.Rerank(pb.RerankRequest(query="capital of France", documents=TEXTS, top_n=3, return_documents=True))
    assert rr.model == "Qwen3-Reranker-tiny" and len(rr.results) == 3
    scores = [x.score for x in rr.results]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert rr.results[0].document == TEXTS[rr.results[0].index]


@pytest.fixture
async def roomy(start_app, tiny_qwen3):
    app = await start_app("--model", str(tiny_qwen3))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}")
    yield app, embedder_pb2_grpc.EmbedderServiceStub(channel), channel
    await channel.close()


async def test_embed_stream_answers_in_order(roomy):
    app, stub, _ = roomy
    requests = [pb.EmbedStreamRequest(inputs=TEXTS[: 1 + i % 4], dimensions=32 if i % 2 else 0) for i in range(8)]

    async def gen():
        for r in requests:
            yield r

    got = [r async for r in stub.EmbedStream(gen(), timeout=60)]
    assert [r.sequence for r in got] == list(range(8))
    for req, resp in zip(requests, got):
        one = await stub.Embed(pb.EmbedRequest.FromString(req.SerializeToString()))
        assert resp.dimensions == one.dimensions and list(resp.token_counts) == list(one.token_counts)
        assert np.abs(tensor.decode(resp.embeddings) - tensor.decode(one.embeddings)).max() < 1e-5


async def test_long_embed_streams_wait_for_room_instead_of_failing(service):
    """Streams of many requests, far more texts than the queue holds (6 here), four at once: each
    keeps its texts in flight within its window (a quarter of the queue) and, when the queue is
    full all the same, waits for room, rather than failing with RESOURCE_EXHAUSTED and losing its
    place; the answers are the unary ones."""
    app, stub, _ = service
    assert app.engine.limits.max_queue == 6

    def requests(k):
        return [pb.EmbedStreamRequest(inputs=[f"text {k} {i} {j}" for j in range(3)]) for i in range(8)]

    async def gen(k):
        for r in requests(k):
            yield r

    got = await asyncio.gather(*(_collect(stub.EmbedStream(gen(k), timeout=120)) for k in range(4)))
    for k, answers in enumerate(got):
        assert [r.sequence for r in answers] == list(range(8))
        one = await stub.Embed(pb.EmbedRequest(inputs=list(requests(k)[5].inputs)), timeout=60)
        assert np.abs(tensor.decode(answers[5].embeddings) - tensor.decode(one.embeddings)).max() < 1e-5


async def _collect(call) -> list:
    return [r async for r in call]


async def test_concurrent_calls_share_batches(service):
    app, stub, _ = service
    engine = app.engine
    before = engine.batcher.batches_run
    gate = threading.Event()
    app.mlx.submit(gate.wait)  # hold the MLX thread so the calls pile up
    calls = [asyncio.ensure_future(stub.Embed(pb.EmbedRequest(inputs=[t]), timeout=30)) for t in TEXTS]
    await asyncio.sleep(0.3)
    gate.set()
    out = await asyncio.gather(*calls)
    assert engine.batcher.batches_run - before <= 2  # one forward for all (at most one more straggler)
    single = [tensor.decode((await stub.Embed(pb.EmbedRequest(inputs=[t]))).embeddings)[0] for t in TEXTS]
    assert np.abs(np.stack([tensor.decode(o.embeddings)[0] for o in out]) - np.stack(single)).max() < 1e-5


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        assert exc.details(), "every error says what to change"
        return exc.code()
    return grpc.StatusCode.OK


BAD = [
    ("empty list", pb.EmbedRequest(inputs=[]), grpc.StatusCode.INVALID_ARGUMENT),
    ("empty string", pb.EmbedRequest(inputs=["ok", "  "]), grpc.StatusCode.INVALID_ARGUMENT),
    # only controls or format characters: each embedded as the empty text would be
    ("only a NUL", pb.EmbedRequest(inputs=["ok", "\x00"]), grpc.StatusCode.INVALID_ARGUMENT),
    ("only zero-width", pb.EmbedRequest(inputs=["\u200b\ufeff \x01"]), grpc.StatusCode.INVALID_ARGUMENT),
    (
        "over-long, truncate=false",
        pb.EmbedRequest(inputs=["word " * 200], truncate=False),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    ("dimensions above size", pb.EmbedRequest(inputs=["x"], dimensions=65), grpc.StatusCode.INVALID_ARGUMENT),
    ("dimensions below minimum", pb.EmbedRequest(inputs=["x"], dimensions=8), grpc.StatusCode.INVALID_ARGUMENT),
    (
        "matryoshka on bert",
        pb.EmbedRequest(inputs=["x"], model="bert-tiny", dimensions=32),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    ("unknown model", pb.EmbedRequest(inputs=["x"], model="qwen3-8b"), grpc.StatusCode.NOT_FOUND),
    (
        "reranker asked to embed",
        pb.EmbedRequest(inputs=["x"], model="Qwen3-Reranker-tiny"),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    ("unknown input type", pb.EmbedRequest(inputs=["x"], input_type=7), grpc.StatusCode.INVALID_ARGUMENT),
    # Too large is never overload: retrying cannot help, so not RESOURCE_EXHAUSTED.
    ("more inputs than the queue", pb.EmbedRequest(inputs=["x"] * 7), grpc.StatusCode.INVALID_ARGUMENT),
    (
        "inputs and token_inputs",
        pb.EmbedRequest(inputs=["x"], token_inputs=[pb.TokenIds(ids=[5])]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "token id outside the vocabulary",
        pb.EmbedRequest(token_inputs=[pb.TokenIds(ids=[5, 10**6])]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    ("negative token id", pb.EmbedRequest(token_inputs=[pb.TokenIds(ids=[-1])]), grpc.StatusCode.INVALID_ARGUMENT),
    (
        "empty token input",
        pb.EmbedRequest(token_inputs=[pb.TokenIds(ids=[5]), pb.TokenIds()]),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
    (
        "token input as a query",
        pb.EmbedRequest(token_inputs=[pb.TokenIds(ids=[5])], input_type=pb.INPUT_TYPE_QUERY),
        grpc.StatusCode.INVALID_ARGUMENT,
    ),
]


@pytest.mark.parametrize("name,request_,code", BAD, ids=[b[0] for b in BAD])
async def test_bad_input_gets_the_right_code_and_service_keeps_serving(service, name, request_, code):
    app, stub, _ = service
    assert await _code(stub.Embed(request_, timeout=30)) == code
    ok = await stub.Embed(pb.EmbedRequest(inputs=["still here"]), timeout=30)
    assert tensor.decode(ok.embeddings).shape == (1, 64)


async def test_bad_rerank_and_truncation(service):
    app, stub, _ = service
    assert await _code(stub.Rerank(pb.RerankRequest(query="q", documents=[]))) == grpc.StatusCode.INVALID_ARGUMENT
    assert await _code(stub.Rerank(pb.RerankRequest(query=" ", documents=["d"]))) == grpc.StatusCode.INVALID_ARGUMENT
    assert (
        await _code(stub.Rerank(pb.RerankRequest(query="q", documents=["d"], model="bert-tiny")))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    long = await stub.Embed(pb.EmbedRequest(inputs=["word " * 200, "short"]))  # truncate defaults to true
    assert long.token_counts[0] == 24 and long.token_counts[1] < 24
    assert np.isfinite(tensor.decode(long.embeddings)).all()


async def test_full_queue_is_resource_exhausted_and_dead_requests_cost_nothing(service):
    app, stub, _ = service
    batcher = app.engine.batcher
    gate = threading.Event()
    app.mlx.submit(gate.wait)  # the MLX thread is busy
    first = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(inputs=TEXTS[:3]), timeout=30))  # taken, waits
    await asyncio.sleep(0.2)
    queued = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(inputs=TEXTS[:3]), timeout=30))  # waits in queue
    expiring = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(inputs=["expires"] * 2), timeout=0.5))
    await asyncio.sleep(0.2)
    assert batcher.queued == 5
    assert (
        await _code(stub.Embed(pb.EmbedRequest(inputs=["one", "two"]), timeout=30))
        == grpc.StatusCode.RESOURCE_EXHAUSTED
    )
    cancelled = stub.Embed(pb.EmbedRequest(inputs=["cancelled"]), timeout=30)
    cancelled_task = asyncio.ensure_future(cancelled)
    await asyncio.sleep(0.2)
    cancelled.cancel()
    assert await _code(expiring) == grpc.StatusCode.DEADLINE_EXCEEDED
    seqs_before = batcher.sequences_run
    gate.set()
    await asyncio.gather(first, queued)
    with pytest.raises(asyncio.CancelledError):
        await cancelled_task
    await asyncio.sleep(0.2)
    assert batcher.sequences_run - seqs_before == 6  # first + queued; the expired and cancelled ones never ran
    assert batcher.queued == 0
    ok = await stub.Embed(pb.EmbedRequest(inputs=["still serving"]), timeout=30)
    assert tensor.decode(ok.embeddings).shape == (1, 64)
