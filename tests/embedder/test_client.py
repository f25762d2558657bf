"""EmbedderClient's fallback chain: remote gRPC / HTTP, local MLX, and stand-in Ollama and
OpenAI servers (stdlib http.server) that speak those APIs' documented formats. The chain only
moves to a backend serving the same model and refuses vectors of another size."""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from extmind.embedder_client import EmbedderClient
from extmind.errors import InvalidArgument, Unavailable
from extmind.procs import free_port


class FakeServer:
    """Ollama (``POST /api/embed``, ``GET /api/tags``) or OpenAI (``POST /v1/embeddings``,
    ``GET /v1/models``) with deterministic vectors; models maps name -> vector size."""

    def __init__(self, kind: str, models: dict[str, int], *, size_override: int | None = None):
        self.kind, self.models, self.size_override = kind, models, size_override
        self.requests: list[tuple[str, dict, dict]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, code, obj):
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                outer.requests.append((self.path, {}, dict(self.headers)))
                if self.path == "/api/tags":
                    return self._send(200, {"models": [{"name": m, "model": m} for m in outer.models]})
                if self.path == "/v1/models":
                    return self._send(200, {"object": "list", "data": [{"id": m} for m in outer.models]})
                self._send(404, {"error": "not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append((self.path, body, dict(self.headers)))
                name = body.get("model")
                if name not in outer.models:
                    msg = f'model "{name}" not found, try pulling it first'
                    return self._send(
                        404,
                        {"error": msg}
                        if outer.kind == "ollama"
                        else {"error": {"message": msg, "type": "invalid_request_error"}},
                    )
                texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
                size = outer.size_override or body.get("dimensions") or outer.models[name]
                vecs = [outer.vector(t, size) for t in texts]
                if self.path == "/api/embed" and outer.kind == "ollama":
                    return self._send(200, {"model": name, "embeddings": vecs, "prompt_eval_count": 3})
                if self.path == "/v1/embeddings" and outer.kind == "openai":
                    return self._send(
                        200,
                        {
                            "object": "list",
                            "model": name,
                            "usage": {"prompt_tokens": 3, "total_tokens": 3},
                            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vecs)],
                        },
                    )
                self._send(404, {"error": f"{self.path} is not an endpoint here"})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @staticmethod
    def vector(text: str, size: int) -> list[float]:
        seed = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)
        v = np.random.default_rng(seed).standard_normal(size)
        return (v / np.linalg.norm(v)).tolist()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def fakes():
    made = []

    def make(*a, **kw):
        s = FakeServer(*a, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def dead_url() -> str:
    return f"127.0.0.1:{free_port()}"  # nothing listens there


async def test_remote_grpc_then_http_then_local_give_the_same_vectors(start_app, tiny_qwen3, models_root, monkeypatch):
    monkeypatch.setenv("MLX_MODELS_DIR", str(models_root))
    app = await start_app("--model", str(tiny_qwen3))
    texts = ["Paris is the capital of France.", "Alice met Bob."]
    results = {}
    for label, url in (
        ("grpc", f"127.0.0.1:{app.server.port}"),
        ("grpc-scheme", f"grpc://127.0.0.1:{app.server.port}"),
        ("http", f"http://127.0.0.1:{app.http.port}"),
        ("local", dead_url()),
    ):
        client = EmbedderClient("Qwen3-Embedding-tiny", url=url, backends=("remote", "local"), timeout=10)
        r = await asyncio.to_thread(client.embed, texts)
        q = await asyncio.to_thread(client.embed, texts, input_type="query", dimensions=32)
        client.close()
        assert r.model == "Qwen3-Embedding-tiny" and r.dimensions == 64 and r.vectors.shape == (2, 64)
        assert q.dimensions == 32
        results[label] = (r, q)
    assert [results[k][0].backend for k in results] == ["remote-grpc", "remote-grpc", "remote-http", "local"]
    base = results["grpc"]
    for label, (r, q) in results.items():
        assert np.abs(r.vectors - base[0].vectors).max() < 1e-5, label
        assert np.abs(q.vectors - base[1].vectors).max() < 1e-5, label


async def test_health_probe(start_app, tiny_qwen3, fakes):
    app = await start_app("--model", str(tiny_qwen3))
    ollama = fakes("ollama", {"qwen3-embedding:0.6b": 1024})
    client = EmbedderClient(
        "qwen3-0.6b", url=f"127.0.0.1:{app.server.port}", ollama_url=ollama.url, openai_api_key="", timeout=5
    )
    h = await asyncio.to_thread(client.health)
    client.close()
    assert h["remote"]["ok"] and h["ollama"]["ok"]
    assert not h["openai"]["ok"] and "OPENAI_API_KEY" in h["openai"]["detail"]
    assert not h["local"]["ok"] and "MLX_MODEL_QWEN3_0_6B_PATH" in h["local"]["detail"]
    # Over HTTP: the embedder's own /health, and another server's 200 that is not it
    http = EmbedderClient("qwen3-0.6b", url=f"http://127.0.0.1:{app.http.port}", backends=("remote",), timeout=5)
    assert (await asyncio.to_thread(http.health))["remote"]["ok"]
    ok = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{"status": "ok"}'
    sock, url = _junk_server(ok)
    try:
        other = EmbedderClient("qwen3-0.6b", url=url, backends=("remote",), timeout=5)
        h = await asyncio.to_thread(other.health)
        assert not h["remote"]["ok"] and "not an extmind embedder" in h["remote"]["detail"]
    finally:
        sock.close()


def test_falls_back_to_ollama_serving_the_same_model(fakes, monkeypatch):
    monkeypatch.delenv("MLX_MODEL_QWEN3_0_6B_PATH", raising=False)
    monkeypatch.delenv("MLX_MODELS_DIR", raising=False)
    ollama = fakes("ollama", {"qwen3-embedding:0.6b": 1024, "nomic-embed-text": 768})
    client = EmbedderClient("qwen3-0.6b", url=dead_url(), ollama_url=ollama.url, openai_api_key="", timeout=5)
    r = client.embed(["a document"])
    q = client.embed(["a question"], input_type="query", instruction="Find facts")
    assert (r.backend, r.model, r.dimensions) == ("ollama", "Qwen/Qwen3-Embedding-0.6B", 1024)
    assert np.allclose(np.linalg.norm(q.vectors, axis=1), 1)
    posts = [(p, b) for p, b, _ in ollama.requests if b]
    assert all(p == "/api/embed" for p, _ in posts)  # the current API, not legacy /api/embeddings
    assert posts[0][1] == {"model": "qwen3-embedding:0.6b", "input": ["a document"], "truncate": True}
    assert posts[1][1]["input"] == ["Instruct: Find facts\nQuery:a question"]


def test_a_service_url_that_is_no_grpc_target_falls_back_saying_why(fakes, monkeypatch):
    monkeypatch.delenv("MLX_MODEL_QWEN3_0_6B_PATH", raising=False)
    monkeypatch.delenv("MLX_MODELS_DIR", raising=False)
    ollama = fakes("ollama", {"qwen3-embedding:0.6b": 1024})
    client = EmbedderClient("qwen3-0.6b", url="localhost", ollama_url=ollama.url, openai_api_key="", timeout=5)
    assert client.embed(["a document"]).backend == "ollama"
    remote = client.health()["remote"]
    assert not remote["ok"] and "MLX_SERVICE_URL: 'localhost' is not a gRPC target" in remote["detail"], remote


def test_refuses_to_fall_back_to_a_different_model(fakes, monkeypatch):
    monkeypatch.delenv("MLX_MODEL_QWEN3_0_6B_PATH", raising=False)
    monkeypatch.delenv("MLX_MODELS_DIR", raising=False)
    ollama = fakes("ollama", {"nomic-embed-text": 768})  # another vector space, not a fallback
    client = EmbedderClient("qwen3-0.6b", url=dead_url(), ollama_url=ollama.url, openai_api_key="", timeout=5)
    with pytest.raises(Unavailable) as err:
        client.embed(["a document"])
    msg = str(err.value)
    assert "qwen3-0.6b" in msg or "Qwen3-Embedding-0.6B" in msg
    assert "remote" in msg and "local" in msg and "ollama" in msg and "openai" in msg
    assert [b["model"] for _, b, _ in ollama.requests if b] == ["qwen3-embedding:0.6b"]  # never asked for nomic

    # Only when the caller explicitly accepts another vector space.
    other = EmbedderClient(
        "qwen3-0.6b",
        url=dead_url(),
        ollama_url=ollama.url,
        openai_api_key="",
        timeout=5,
        allow_other_model=True,
        other_models={"ollama": "nomic-embed-text"},
    )
    r = other.embed(["a document"])
    assert (r.backend, r.model, r.dimensions) == ("ollama", "nomic-embed-text", 768)


def test_openai_fallback_and_refusal_of_silently_different_dims(fakes, monkeypatch):
    monkeypatch.delenv("MLX_MODEL_QWEN3_0_6B_PATH", raising=False)
    monkeypatch.delenv("MLX_MODELS_DIR", raising=False)
    dead_ollama = f"http://{dead_url()}"
    good = fakes("openai", {"Qwen/Qwen3-Embedding-0.6B": 1024})
    client = EmbedderClient(
        "qwen3-0.6b",
        url=dead_url(),
        ollama_url=dead_ollama,
        openai_api_key="sk-test",
        openai_base_url=good.url + "/v1",
        timeout=5,
    )
    r = client.embed(["x", "y"], dimensions=256)
    assert (r.backend, r.model, r.dimensions) == ("openai", "Qwen/Qwen3-Embedding-0.6B", 256)
    path, body, headers = [x for x in good.requests if x[1]][0]
    assert path == "/v1/embeddings" and headers["Authorization"] == "Bearer sk-test"
    assert body == {
        "model": "Qwen/Qwen3-Embedding-0.6B",
        "input": ["x", "y"],
        "encoding_format": "float",
        "dimensions": 256,
    }

    liar = fakes("openai", {"Qwen/Qwen3-Embedding-0.6B": 1024}, size_override=768)  # claims the model, wrong size
    client = EmbedderClient(
        "qwen3-0.6b",
        url=dead_url(),
        ollama_url=dead_ollama,
        openai_api_key="sk-test",
        openai_base_url=liar.url + "/v1",
        timeout=5,
    )
    with pytest.raises(Unavailable) as err:
        client.embed(["x"])
    assert "768" in str(err.value) and "not the same vector space" in str(err.value)


async def test_pinned_client_never_mixes_after_the_first_result(start_app, tiny_qwen3, fakes):
    app = await start_app("--model", str(tiny_qwen3))
    ollama = fakes("ollama", {"qwen3-embedding:0.6b": 1024})
    # No model named: the service's default is used, and the client pins to it.
    client = EmbedderClient(
        url=f"127.0.0.1:{app.server.port}", backends=("remote", "ollama"), ollama_url=ollama.url, timeout=5
    )
    first = await asyncio.to_thread(client.embed, ["hello"])
    assert first.model == "Qwen3-Embedding-tiny" and client.pinned == ("Qwen3-Embedding-tiny", 64)
    await app.stop(0)
    with pytest.raises(Unavailable):
        await asyncio.to_thread(client.embed, ["hello again"])  # Ollama's Qwen3 is another model than the pin
    # Ollama was only asked for the pinned model (which it does not have), never for its own Qwen3.
    assert [b["model"] for _, b, _ in ollama.requests if b] == ["Qwen3-Embedding-tiny"]
    client.close()


def test_the_client_package_never_imports_the_services():
    """extmind is installable alone: importing the client (and the model table) loads nothing of
    services/; only the optional local backend does, when the client uses it."""
    import subprocess
    import sys

    code = (
        "import sys, extmind.embedder_client, extmind.embedding_models; "
        "print(sorted(m for m in sys.modules if m == 'services' or m.startswith('services.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def _readme_client_example() -> str:
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("**Python client**", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


async def test_the_readme_client_example_works_against_the_default_embedder(start_app, monkeypatch):
    """The README's snippet, run as written against an embedder with the cluster's default model."""
    for var in ("EMBEDDER_MODEL", "EMBEDDER_MODELS", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    app = await start_app()  # what `make up` serves by default
    monkeypatch.setenv("MLX_SERVICE_URL", f"grpc://127.0.0.1:{app.server.port}")
    monkeypatch.setenv("OLLAMA_URL", f"http://{dead_url()}")
    scope: dict = {}
    await asyncio.to_thread(exec, _readme_client_example(), scope)
    r = scope["r"]
    assert r.backend == "remote-grpc" and r.model == "sentence-transformers/all-MiniLM-L6-v2"
    assert r.vectors.shape == (1, 384)
    scope["c"].close()


def _junk_server(answer: bytes):
    """A TCP server at 127.0.0.1 that answers every connection with ``answer`` and closes."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()

    def serve():
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(65536)
                conn.sendall(answer)

    threading.Thread(target=serve, daemon=True).start()
    return sock, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize(
    "answer",
    [
        b"\x00\x00\x18\x04\x00\x00\x00\x00\x00\x00\x04\x00@\x00\x00",  # an HTTP/2 SETTINGS frame (a gRPC port)
        b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{"status": "ok"}',
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 9\r\n\r\n[1, 2, 3]",
    ],
    ids=["not_http", "json_without_embeddings", "json_not_an_object"],
)
def test_a_foreign_server_at_the_remote_url_falls_back(fakes, monkeypatch, answer):
    """MLX_SERVICE_URL naming a server that is not an extmind embedder: the client says why and
    tries the next backend, instead of raising the HTTP library's or a KeyError."""
    monkeypatch.delenv("MLX_MODEL_QWEN3_0_6B_PATH", raising=False)
    monkeypatch.delenv("MLX_MODELS_DIR", raising=False)
    ollama = fakes("ollama", {"qwen3-embedding:0.6b": 1024})
    sock, url = _junk_server(answer)
    try:
        client = EmbedderClient("qwen3-0.6b", url=url, ollama_url=ollama.url, openai_api_key="", timeout=5)
        assert client.embed(["a document"]).backend == "ollama"
        client.backends = ["remote"]
        with pytest.raises(Unavailable, match=r"remote: .*127\.0\.0\.1"):
            client.embed(["a document"])
        health = client.health()["remote"]  # the same server probed: not healthy, and says why
        assert not health["ok"] and "127.0.0.1" in health["detail"]
    finally:
        sock.close()


def test_a_lone_surrogate_is_invalid_argument_on_every_transport():
    for url in ("grpc://127.0.0.1:1", "http://127.0.0.1:1"):
        with pytest.raises(InvalidArgument, match="text 1 is not valid Unicode"):
            EmbedderClient(url=url, timeout=1).embed(["fine", "bad \ud800"])
