"""The HTTP face: the /embed shape older clients send, OpenAI's /v1/embeddings, /health while loading
and when ready -- on the same engine (and queue) as gRPC."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json

import grpc
import numpy as np

from extmind import tensor
from extmind.v1 import embedder_pb2 as pb
from extmind.v1 import embedder_pb2_grpc
from services.embedder.http_face import HttpFace

from .http_client import call, request_with_headers


async def test_health_is_503_while_loading_then_200(tiny_qwen3):
    from services.common.mlx_thread import MLXThread
    from services.embedder import registry
    from services.embedder.engine import EmbedderEngine

    face = HttpFace()
    port = await face.start("127.0.0.1", 0)
    try:
        assert (await call(port, "GET", "/health"))[0] == 503
        status, body, headers = await asyncio.to_thread(request_with_headers, port, "POST", "/embed", {"texts": ["x"]})
        assert status == 503 and "loading" in body["error"]["message"]
        assert headers.get("retry-after") == "1"
        mlx = MLXThread("http-test")
        engine = EmbedderEngine([mlx.call(registry.load, registry.resolve(str(tiny_qwen3)))], mlx)
        await engine.start()
        face.engine = engine
        assert await call(port, "GET", "/health") == (200, {"status": "ok", "models": ["Qwen3-Embedding-tiny"]})
        await engine.stop()
        mlx.shutdown()
    finally:
        await face.stop()


async def test_embed_shape_and_same_vectors_as_grpc(start_app, tiny_qwen3):
    app = await start_app("--model", "qwen3-0.6b", env={"MLX_MODEL_QWEN3_0_6B_PATH": str(tiny_qwen3)})
    port = app.http.port
    texts = ["Paris is the capital of France.", "Alice met Bob."]
    # Exactly what older clients send: texts + input + model alias.
    status, body = await call(port, "POST", "/embed", {"texts": texts, "input": texts, "model": "qwen3-0.6b"})
    assert status == 200
    assert set(body) >= {"embeddings", "model", "dimensions"}
    assert body["model"] == "Qwen/Qwen3-Embedding-0.6B" and body["dimensions"] == 64
    assert len(body["embeddings"]) == 2 and all(len(e) == 64 for e in body["embeddings"])
    status, only_input = await call(port, "POST", "/embed", {"input": texts})
    assert status == 200 and np.allclose(only_input["embeddings"], body["embeddings"], atol=1e-6)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as ch:
        r = await embedder_pb2_grpc.EmbedderServiceStub(ch).Embed(pb.EmbedRequest(inputs=texts, model="qwen3-0.6b"))
    assert np.abs(np.asarray(body["embeddings"]) - tensor.decode(r.embeddings)).max() < 1e-6
    assert body["token_counts"] == list(r.token_counts)

    status, q = await call(port, "POST", "/embed", {"texts": texts, "input_type": "query", "dimensions": 32})
    assert status == 200 and q["dimensions"] == 32 and len(q["embeddings"][0]) == 32

    # An alias the service does not serve: a clear 404, never another model's vectors.
    status, err = await call(port, "POST", "/embed", {"texts": texts, "model": "qwen3-4b"})
    assert status == 404 and "qwen3-4b" in err["error"]["message"]


async def test_openai_embeddings(start_app, tiny_qwen3):
    app = await start_app("--model", str(tiny_qwen3))
    port = app.http.port
    status, one = await call(port, "POST", "/v1/embeddings", {"input": "hello there", "model": "Qwen3-Embedding-tiny"})
    assert status == 200 and one["object"] == "list" and one["model"] == "Qwen3-Embedding-tiny"
    assert one["data"][0]["object"] == "embedding" and one["data"][0]["index"] == 0
    assert one["usage"]["prompt_tokens"] == one["usage"]["total_tokens"] > 0
    status, many = await call(
        port,
        "POST",
        "/v1/embeddings",
        {"input": ["hello there", "general kenobi"], "encoding_format": "base64", "dimensions": 48},
    )
    assert status == 200 and [d["index"] for d in many["data"]] == [0, 1]
    vecs = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in many["data"]])
    assert vecs.shape == (2, 48)
    status, floats = await call(port, "POST", "/v1/embeddings", {"input": ["hello there"], "dimensions": 48})
    assert np.abs(vecs[0] - np.asarray(floats["data"][0]["embedding"])).max() < 1e-7
    status, models = await call(port, "GET", "/v1/models")
    assert status == 200 and models["data"][0]["id"] == "Qwen3-Embedding-tiny"


async def test_http_errors_and_keep_alive(start_app, tiny_qwen3):
    app = await start_app("--model", str(tiny_qwen3))
    port = app.http.port
    cases = [
        ("POST", "/embed", {"texts": []}, 400),
        ("POST", "/embed", {"texts": [""]}, 400),
        ("POST", "/embed", {"texts": ["x"], "dimensions": 1000}, 400),
        ("POST", "/embed", {"texts": ["x"], "model": "nope"}, 404),
        ("POST", "/v1/embeddings", {"input": [[1, 2, 10**6]]}, 400),
        ("POST", "/v1/embeddings", {"input": [[1, 2, 3.5]]}, 400),
        ("POST", "/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 400),
        ("GET", "/nowhere", None, 404),
        ("GET", "/embed", None, 405),
    ]
    for method, path, body, code in cases:
        status, err = await call(port, method, path, body)
        assert status == code and err["error"]["message"], (path, body, status, err)
    status, err = await call(port, "POST", "/embed", raw=b"{not json")
    assert status == 400 and "JSON" in err["error"]["message"]
    # The field at fault is named (OpenAI's param) also when the model refuses it; a path that
    # exists says which method it takes.
    for dims in (7, 1000):
        status, err = await call(port, "POST", "/v1/embeddings", {"input": "x", "dimensions": dims})
        assert status == 400 and err["error"]["param"] == "dimensions", err
    status, err = await call(port, "GET", "/v1/embeddings")
    assert status == 405 and "use POST" in err["error"]["message"], err

    def two_on_one_connection():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        out = []
        for _ in range(2):
            conn.request(
                "POST", "/embed", body=json.dumps({"texts": ["again"]}), headers={"Content-Type": "application/json"}
            )
            r = conn.getresponse()
            out.append((r.status, json.loads(r.read())["dimensions"]))
        conn.close()
        return out

    assert await asyncio.to_thread(two_on_one_connection) == [(200, 64), (200, 64)]
    assert (await call(port, "GET", "/health"))[0] == 200
