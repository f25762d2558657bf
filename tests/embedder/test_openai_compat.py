"""What stock clients send and accept: token-id input (OpenAI's `input` forms and gRPC
`token_inputs`), model-name aliases, OpenAI-shaped errors, limits that are never answered as
retryable, and answers kept within what a default gRPC channel receives."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading

import grpc
import numpy as np
import pytest

from extmind import tensor
from extmind.errors import InvalidArgument
from extmind.v1 import embedder_pb2 as pb
from extmind.v1 import embedder_pb2_grpc
from services.embedder.servicer import response_bytes

from .http_client import call, request_with_headers

TEXTS = ["hello there", "general kenobi, you are a bold one", "42"]


@pytest.fixture
async def both(start_app, tiny_qwen3, tiny_bert):
    app = await start_app(
        "--model",
        str(tiny_qwen3),
        "--model",
        str(tiny_bert),
        "--model-alias",
        "text-embedding-3-small=Qwen3-Embedding-tiny",
        "--model-alias",
        "text-embedding-ada-002=bert-tiny",
        "--max-inputs-per-request",
        "4",
        "--max-queue",
        "6",
        "--max-input-tokens",
        "24",
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}")
    yield app, embedder_pb2_grpc.EmbedderServiceStub(channel)
    await channel.close()


async def _rpc_error(call) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


def _vectors(body: dict) -> np.ndarray:
    return np.asarray([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])


# --- token-id input ------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["Qwen3-Embedding-tiny", "bert-tiny"])
async def test_openai_token_ids_give_the_text_vectors(both, model):
    app, stub = both
    port = app.http.port
    status, by_text = await call(port, "POST", "/v1/embeddings", {"input": TEXTS, "model": model})
    assert status == 200
    tok = await stub.Tokenize(pb.TokenizeRequest(inputs=TEXTS, model=model))
    full = [list(r.token_ids) for r in tok.results]  # special tokens included, untruncated
    used = [min(len(f), 24) for f in full]  # --max-input-tokens 24
    m = app.engine.find(model, "embedding")
    bare = [[t for t in ids if t not in m.with_special_tokens([])] for ids in full]  # the recipe adds them back
    assert all(len(b) < len(f) for b, f in zip(bare, full))

    for ids in (full, bare):
        status, by_ids = await call(port, "POST", "/v1/embeddings", {"input": ids, "model": model})
        assert status == 200, by_ids
        assert np.abs(_vectors(by_ids) - _vectors(by_text)).max() < 1e-5
        assert by_ids["usage"]["prompt_tokens"] == by_text["usage"]["prompt_tokens"] == sum(used)
    # One flat list of ids is one input.
    status, one = await call(
        port, "POST", "/v1/embeddings", {"input": bare[1], "model": model, "encoding_format": "float"}
    )
    assert status == 200 and len(one["data"]) == 1
    assert np.abs(_vectors(one)[0] - _vectors(by_text)[1]).max() < 1e-5

    # The same over gRPC, Embed and EmbedStream.
    r = await stub.Embed(pb.EmbedRequest(token_inputs=[pb.TokenIds(ids=b) for b in bare], model=model), timeout=30)
    assert np.abs(tensor.decode(r.embeddings) - _vectors(by_text)).max() < 1e-5
    assert list(r.token_counts) == used

    async def gen():
        yield pb.EmbedStreamRequest(token_inputs=[pb.TokenIds(ids=full[0])], model=model)
        yield pb.EmbedStreamRequest(inputs=TEXTS[1:], model=model)

    got = [x async for x in stub.EmbedStream(gen(), timeout=30)]
    assert np.abs(np.concatenate([tensor.decode(x.embeddings) for x in got]) - _vectors(by_text)).max() < 1e-5


async def test_token_ids_are_checked_and_truncated_like_text(both):
    app, stub = both
    port = app.http.port
    vocab = app.engine.find("Qwen3-Embedding-tiny", "embedding").vocab_size
    assert vocab > 0
    for bad, needle in [
        ([5, vocab], str(vocab)),
        ([[5], [7, -3]], "-3"),
        ([[5], []], "empty"),
        ([[5, True]], "True"),
        ([[5], "x"], "'input'"),
        ([], "'input'"),
    ]:
        status, err = await call(port, "POST", "/v1/embeddings", {"input": bad})
        assert status == 400 and needle in err["error"]["message"], (bad, err)
        assert err["error"]["type"] == "invalid_request_error" and err["error"]["code"] == "invalid_argument"
    status, err = await call(port, "POST", "/v1/embeddings", {"input": [5, 6], "input_type": "query"})
    assert status == 400 and "send queries as text" in err["error"]["message"]
    e = await _rpc_error(stub.Embed(pb.EmbedRequest(token_inputs=[pb.TokenIds(ids=[5, vocab + 7])])))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and str(vocab + 7) in e.details()
    # Over-long: first limit-1 ids plus the end token, as for text; truncate=false refuses.
    long = list(range(5, 65))
    r = await stub.Embed(pb.EmbedRequest(token_inputs=[pb.TokenIds(ids=long)]), timeout=30)
    assert list(r.token_counts) == [24]
    e = await _rpc_error(stub.Embed(pb.EmbedRequest(token_inputs=[pb.TokenIds(ids=long)], truncate=False)))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "24" in e.details()


# --- limits: too large is 400 / INVALID_ARGUMENT, only overload is 429 / RESOURCE_EXHAUSTED ----------


async def test_too_many_inputs_is_not_retryable_anywhere(both):
    app, stub = both
    port = app.http.port
    five = [f"text {i}" for i in range(5)]
    for path, body in [
        ("/v1/embeddings", {"input": five}),
        ("/v1/embeddings", {"input": [[5, 6]] * 5}),
        ("/embed", {"texts": five}),
    ]:
        status, err = await call(port, "POST", path, body)
        assert status == 400, (path, status, err)
        assert err["error"]["code"] == "invalid_argument" and err["error"]["type"] == "invalid_request_error"
        assert "limit is 4" in err["error"]["message"] and "--max-inputs-per-request" in err["error"]["message"]
    for rpc in [
        stub.Embed(pb.EmbedRequest(inputs=five)),
        stub.Embed(pb.EmbedRequest(token_inputs=[pb.TokenIds(ids=[5])] * 5)),
        stub.Tokenize(pb.TokenizeRequest(inputs=five)),
    ]:
        e = await _rpc_error(rpc)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 4" in e.details()

    async def stream():
        yield pb.EmbedStreamRequest(inputs=five)

    e = await _rpc_error(_drain(stub.EmbedStream(stream())))
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 4" in e.details()
    ok = await stub.Embed(pb.EmbedRequest(inputs=five[:4]), timeout=30)
    assert tensor.decode(ok.embeddings).shape == (4, 64)


async def test_rerank_too_many_documents_is_invalid_argument(start_app, tiny_reranker, tiny_qwen3):
    app = await start_app("--model", str(tiny_qwen3), "--reranker", str(tiny_reranker), "--max-inputs-per-request", "2")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as ch:
        stub = embedder_pb2_grpc.EmbedderServiceStub(ch)
        e = await _rpc_error(stub.Rerank(pb.RerankRequest(query="q", documents=["a", "b", "c"])))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "limit is 2" in e.details()
        assert len((await stub.Rerank(pb.RerankRequest(query="q", documents=["a", "b"]))).results) == 2


async def _drain(call):
    return [x async for x in call]


async def test_a_full_queue_is_the_only_429(both):
    app, stub = both
    gate = threading.Event()
    app.mlx.submit(gate.wait)  # the MLX thread is busy
    first = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(inputs=TEXTS), timeout=30))  # taken, waits
    await asyncio.sleep(0.2)
    queued = asyncio.ensure_future(stub.Embed(pb.EmbedRequest(inputs=TEXTS + ["x"]), timeout=30))  # 4 of 6 queued
    await asyncio.sleep(0.2)
    try:
        status, err, headers = await asyncio.to_thread(
            request_with_headers, app.http.port, "POST", "/v1/embeddings", {"input": ["a", "b", "c"]}
        )
        assert status == 429 and err["error"]["code"] == "resource_exhausted", err
        assert headers.get("retry-after") == "1"  # retryable: says when
        assert err["error"]["type"] == "invalid_request_error" and "retry" in err["error"]["message"]
    finally:
        gate.set()
    await asyncio.gather(first, queued)
    assert (await call(app.http.port, "POST", "/v1/embeddings", {"input": ["a", "b", "c"]}))[0] == 200


# --- answers within what clients receive ---------------------------------------------------------


def test_the_default_budget_refuses_what_stock_clients_cannot_receive():
    from services.embedder.app import parse_args

    budget = int(parse_args([]).max_response_mb * (1 << 20))
    assert budget == 4 << 20
    assert response_bytes(512, 2560, "Qwen/Qwen3-Embedding-4B") > budget  # 5.2 MB: refused up front
    assert response_bytes(512, 1024, "Qwen/Qwen3-Embedding-0.6B") < budget  # 2.1 MB: served


async def test_embed_over_the_response_budget_is_refused_up_front(start_app, tiny_qwen3):
    app = await start_app("--model", str(tiny_qwen3), "--max-response-mb", "0.01")  # 10 KiB; a row is 261 bytes
    many = [f"text number {i}" for i in range(50)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as ch:
        stub = embedder_pb2_grpc.EmbedderServiceStub(ch)
        runs = app.engine.batcher.sequences_run
        e = await _rpc_error(stub.Embed(pb.EmbedRequest(inputs=many)))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
        for needle in ("0.01 MiB", "--max-response-mb", "EmbedStream", "at most 39 inputs"):
            assert needle in e.details(), e.details()
        assert app.engine.batcher.sequences_run == runs  # refused before any model time
        info = await stub.GetInfo(pb.EmbedderServiceGetInfoRequest())
        assert info.batching.max_response_bytes == 10485  # callers can size their batches

        async def stream():
            yield pb.EmbedStreamRequest(inputs=many)

        e = await _rpc_error(_drain(stub.EmbedStream(stream())))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "EmbedStream" in e.details()

        # What the message suggests works, and the estimate bounds the real size.
        r = await stub.Embed(pb.EmbedRequest(inputs=many[:39]), timeout=30)
        assert r.ByteSize() <= response_bytes(39, 64, r.model) <= 0.01 * (1 << 20)

        async def split():
            for i in range(0, 50, 25):
                yield pb.EmbedStreamRequest(inputs=many[i : i + 25])

        got = await _drain(stub.EmbedStream(split(), timeout=30))
        assert sum(tensor.decode(x.embeddings).shape[0] for x in got) == 50
        assert all(x.ByteSize() <= response_bytes(25, 64, x.model) for x in got)
        half = await stub.Embed(pb.EmbedRequest(inputs=many, dimensions=32), timeout=30)  # fewer dimensions fit
        assert tensor.decode(half.embeddings).shape == (50, 32)
        # Tokenize's answer is bounded the same way (checked once tokenized).
        e = await _rpc_error(stub.Tokenize(pb.TokenizeRequest(inputs=["many words here " * 100] * 10)))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "--max-response-mb" in e.details()
        assert "fewer or shorter texts" in e.details()
        t = await stub.Tokenize(pb.TokenizeRequest(inputs=["many words here " * 100]))
        assert t.ByteSize() <= 0.01 * (1 << 20)
    # The HTTP face has no such client limit.
    status, body = await call(app.http.port, "POST", "/v1/embeddings", {"input": many})
    assert status == 200 and len(body["data"]) == 50


# --- model aliases and the OpenAI error shape ----------------------------------------------------


async def test_model_aliases(both):
    app, stub = both
    port = app.http.port
    status, body = await call(port, "POST", "/v1/embeddings", {"input": "hi", "model": "text-embedding-3-small"})
    assert status == 200 and body["model"] == "Qwen3-Embedding-tiny"  # the canonical name answers
    status, body = await call(port, "POST", "/v1/embeddings", {"input": "hi", "model": "text-embedding-ada-002"})
    assert status == 200 and body["model"] == "bert-tiny" and len(body["data"][0]["embedding"]) == 64
    r = await stub.Embed(pb.EmbedRequest(inputs=["hi"], model="TEXT-EMBEDDING-3-SMALL"))
    assert r.model == "Qwen3-Embedding-tiny"
    info = await stub.GetInfo(pb.EmbedderServiceGetInfoRequest())
    assert "text-embedding-3-small" in next(m for m in info.models if m.name == "Qwen3-Embedding-tiny").aliases
    status, err = await call(port, "POST", "/v1/embeddings", {"input": "hi", "model": "text-embedding-3-large"})
    assert status == 404 and err["error"] == {
        "message": err["error"]["message"],
        "type": "invalid_request_error",
        "param": None,
        "code": "model_not_found",
    }
    assert "text-embedding-3-small" in err["error"]["message"]  # served names and aliases listed


async def test_a_bad_field_is_named_in_param(both):
    # OpenAI's error body names the offending field, as the generator's face does.
    app, _ = both
    cases = [
        ("/v1/embeddings", {"input": 5}, "input"),
        ("/v1/embeddings", {"input": [[1, "a"]]}, "input"),
        ("/v1/embeddings", {"input": "x", "model": 3}, "model"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ("/embed", {"texts": 5}, "texts"),
        ("/embed", {}, "texts"),
        ("/embed", {"texts": ["x"], "dimensions": -1}, "dimensions"),
        ("/embed", {"texts": ["x"], "normalize": "yes"}, "normalize"),
        ("/embed", {"texts": ["x"], "input_type": "passage"}, "input_type"),
        ("/embed", {"texts": ["x"], "instruction": 7}, "instruction"),
    ]
    for path, body, param in cases:
        status, err = await call(app.http.port, "POST", path, body)
        assert status == 400 and err["error"]["code"] == "invalid_argument", (path, body, err)
        assert err["error"]["param"] == param, (path, body, err)
        assert f"'{param}'" in err["error"]["message"], (path, body, err)


def test_aliases_from_the_environment_and_bad_ones(monkeypatch):
    from services.embedder.app import parse_args

    monkeypatch.setenv("EMBEDDER_MODEL_ALIASES", "text-embedding-3-small=minilm, ada = all-minilm-l6-v2")
    assert parse_args([]).model_alias == {"text-embedding-3-small": "minilm", "ada": "all-minilm-l6-v2"}
    assert parse_args(["--model-alias", "x=y"]).model_alias == {"x": "y"}  # the flag wins
    with pytest.raises(SystemExit):
        parse_args(["--model-alias", "no-equals-sign"])


async def test_an_alias_to_nothing_served_fails_start_up(start_app, tiny_qwen3):
    with pytest.raises(InvalidArgument, match="text-embedding-3-small=qwen3-8b"):
        await start_app("--model", str(tiny_qwen3), "--model-alias", "text-embedding-3-small=qwen3-8b")
    with pytest.raises(InvalidArgument, match="already names a served model"):
        await start_app("--model", str(tiny_qwen3), "--model-alias", "qwen3-embedding-tiny=Qwen3-Embedding-tiny")


async def test_every_error_has_the_openai_shape(start_app, tiny_qwen3):
    app = await start_app("--model", str(tiny_qwen3), "--auth-token", "s3cret", "--max-message-mb", "1")
    port = app.http.port

    def authed(method, path, body=None, raw=None, token="s3cret"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        out = r.status, json.loads(r.read())
        conn.close()
        return out

    cases = [
        (("POST", "/v1/embeddings", {"input": "x"}, None, "wrong"), 401, "invalid_request_error", "unauthenticated"),
        (("POST", "/v1/embeddings", {"input": ""}), 400, "invalid_request_error", "invalid_argument"),
        (("POST", "/v1/embeddings", {"input": "x", "model": "nope"}), 404, "invalid_request_error", "model_not_found"),
        (("GET", "/v1/embeddings"), 405, "invalid_request_error", "unimplemented"),
        (("GET", "/nowhere"), 404, "invalid_request_error", "not_found"),
        (("POST", "/v1/embeddings", None, b"[1"), 400, "invalid_request_error", "invalid_argument"),
    ]
    for args, status, kind, code in cases:
        got, body = await asyncio.to_thread(authed, *args)
        assert (got, body["error"]["type"], body["error"]["code"]) == (status, kind, code), (args[:2], body)
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]

    def too_large():  # the size is refused from the headers: the body is never read
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(
                b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                b"Content-Length: 2097152\r\n\r\n"
            )
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), json.loads(body)

    got, body = await asyncio.to_thread(too_large)
    assert (got, body["error"]["type"], body["error"]["code"]) == (413, "invalid_request_error", "invalid_argument")
    assert "--max-message-mb" in body["error"]["message"]
    engine, app.http.engine = app.http.engine, None  # as while loading
    got, body = await asyncio.to_thread(authed, "POST", "/v1/embeddings", {"input": "x"})
    assert (got, body["error"]["type"], body["error"]["code"]) == (503, "service_unavailable", "unavailable")
    app.http.engine = engine
    got, body = await asyncio.to_thread(authed, "POST", "/v1/embeddings", {"input": "x"})
    assert got == 200


async def test_rerank_echoing_documents_over_the_budget_is_refused_up_front(start_app, tiny_qwen3, tiny_reranker):
    app = await start_app("--model", str(tiny_qwen3), "--reranker", str(tiny_reranker), "--max-response-mb", "0.01")
    docs = [f"document {i} " + "filler text " * 300 for i in range(4)]  # ~3.6 KB each
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as ch:
        stub = embedder_pb2_grpc.EmbedderServiceStub(ch)
        runs = app.engine.batcher.sequences_run
        e = await _rpc_error(stub.Rerank(pb.RerankRequest(query="q", documents=docs, return_documents=True)))
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and "return_documents=false" in e.details()
        assert app.engine.batcher.sequences_run == runs
        r = await stub.Rerank(pb.RerankRequest(query="q", documents=docs), timeout=30)
        assert len(r.results) == 4
        top = await stub.Rerank(pb.RerankRequest(query="q", documents=docs, return_documents=True, top_n=2), timeout=30)
        assert len(top.results) == 2 and top.results[0].document == docs[top.results[0].index]
