"""The generator's HTTP face in-process, on an engine the test can inspect: /health while loading,
and a client that leaves a stream mid-way frees its batch slot at once (one that leaves before
its first token is never prefilled)."""

from __future__ import annotations

import asyncio
import json
import socket
import threading

from prometheus_client import REGISTRY

from extmind.tiny_models import build_chain_llama
from extmind.tiny_tokenizers import build_tokenizer
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.http_face import GeneratorHttpFace


def _get(port: int, path: str) -> tuple[int, dict]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path)
    r = conn.getresponse()
    out = r.status, json.loads(r.read())
    conn.close()
    return out


async def test_health_while_loading_and_a_stream_left_midway_frees_its_slot(tmp_path):
    from tokenizers import Tokenizer

    build_tokenizer(tmp_path, "llama")
    vocab = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab()
    a, b = vocab["Ġmoon"], vocab["Ġrain"]
    build_chain_llama(tmp_path, {a: b, b: a})  # " moon rain moon rain ...": never ends by itself
    engine = GeneratorEngine(EngineConfig(model=str(tmp_path)))
    face = GeneratorHttpFace(engine)
    port = await face.start("127.0.0.1", 0)
    try:
        status, body = await asyncio.to_thread(_get, port, "/health")
        assert (status, body) == (503, {"status": "loading"})
        status, body = await asyncio.to_thread(_get, port, "/v1/models")
        assert status == 503 and body["error"]["code"] == "unavailable" and "loading" in body["error"]["message"]
        await asyncio.to_thread(engine.start)
        face.loaded = True
        assert (await asyncio.to_thread(_get, port, "/health"))[0] == 200

        def stream_then_leave() -> bytes:
            payload = json.dumps({"prompt": " moon", "stream": True, "max_tokens": 4000}).encode()
            with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
                sock.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                got = b""
                while got.count(b"data: ") < 5:
                    got += sock.recv(65536)
            return got

        got = await asyncio.to_thread(stream_then_leave)
        assert got.startswith(b"HTTP/1.1 200") and b" rain" in got
        # Freed within a few decode steps of the client leaving; running out its 4000 tokens takes
        # about 5 s on a 2-core CPU.
        for _ in range(30):
            if engine.stats()["active"] == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats()["active"] == 0

        # The same for a whole (not streamed) answer: the client hangs up while it is generated.
        payload = json.dumps({"prompt": " moon", "max_tokens": 4000}).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        for _ in range(100):
            if engine.stats()["active"] == 1:
                break
            await asyncio.sleep(0.02)
        assert engine.stats()["active"] == 1  # being generated
        sock.close()
        for _ in range(40):  # cancelled once the hang-up is seen, long before its 4000 tokens
            if engine.stats()["active"] == 0:
                break
            await asyncio.sleep(0.05)
        assert engine.stats()["active"] == 0

        # A client that hangs up before the first token (its request still queued behind other
        # work on the MLX thread): the request is dropped there, never prefilled.
        def hung_up() -> float:
            labels = {"face": "generator", "route": "/v1/completions", "method": "POST", "status": "499"}
            return REGISTRY.get_sample_value("extmind_http_requests_total", labels) or 0.0

        prompt_tokens = REGISTRY.get_sample_value("extmind_generator_prompt_tokens_total")
        for _ in range(100):  # the scheduler dropped its last group: it submits no more steps
            if engine.stats()["groups"] == 0:
                break
            await asyncio.sleep(0.02)
        gate, holding = threading.Event(), threading.Event()
        engine.mlx.submit(lambda: holding.set() or gate.wait(30))
        assert await asyncio.to_thread(holding.wait, 30)
        try:
            for stream in (False, True):
                before = hung_up()
                payload = json.dumps({"prompt": " moon", "max_tokens": 4000, "stream": stream}).encode()
                sock = socket.create_connection(("127.0.0.1", port), timeout=30)
                sock.sendall(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
                for _ in range(100):  # its admit is queued behind the held thread
                    if engine.mlx.has_waiting():
                        break
                    await asyncio.sleep(0.02)
                assert engine.mlx.has_waiting()
                sock.close()
                for _ in range(100):  # the hang-up is seen while the admit still waits
                    if hung_up() > before:
                        break
                    await asyncio.sleep(0.02)
                assert hung_up() == before + 1, stream
        finally:
            gate.set()
        assert engine.mlx.call(lambda: engine.stats()["active"]) == 0
        assert REGISTRY.get_sample_value("extmind_generator_prompt_tokens_total") == prompt_tokens
    finally:
        await face.stop()
        await asyncio.to_thread(engine.stop)
