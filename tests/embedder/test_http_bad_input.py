"""Malformed HTTP the embedder's face must answer with a 4xx (never a 500, never a hang): bodies
that are not UTF-8 or hold lone surrogates, wrong JSON types, and what uvicorn/h11 refuses at the
protocol level (a bad Content-Length, oversized headers, a body cut short). /metrics is served."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from .http_client import call


@pytest.fixture
async def port(start_app, tiny_qwen3):
    app = await start_app("--model", str(tiny_qwen3))
    return app.http.port


async def test_bodies_that_are_not_text_or_have_wrong_types_are_400(port):
    cases = [
        ("/v1/embeddings", b'{"input": "caf\xe9"}', "UTF-8"),  # Latin-1, not UTF-8
        ("/v1/embeddings", b'{"input": "a\\ud800b"}', "surrogate"),
        ("/embed", b'{"texts": ["\\udfff"]}', "surrogate"),
        ("/v1/embeddings", b'{"input": "x", "model": 7}', "'model'"),
        ("/embed", b'{"texts": ["x"], "model": ["a"]}', "'model'"),
        ("/v1/embeddings", b'{"input": "x", "encoding_format": 1}', "'encoding_format'"),
        ("/embed", b'{"texts": ["x"], "input_type": 3}', "'input_type'"),
        ("/embed", b'{"texts": ["x"], "instruction": {}}', "'instruction'"),
        ("/embed", b"[" * 100_000 + b"]" * 100_000, "JSON"),
        ("/embed", b'{"texts": ["x"], "normalize": "false"}', "'normalize' must be true or false"),  # not silently on
        ("/embed", b'{"texts": ["x"], "truncate": 0}', "'truncate' must be true or false"),
        ("/v1/embeddings", b'{"input": "x", "max_tokens": ' + b"9" * 5000 + b"}", "cannot read"),  # > 4300 digits
    ]
    for path, raw, words in cases:
        status, err = await call(port, "POST", path, raw=raw)
        assert status == 400, (raw[:60], status, err)
        assert err["error"]["code"] == "invalid_argument" and words in err["error"]["message"], (raw[:60], err)
    assert (await call(port, "POST", "/v1/embeddings", {"input": "still serving"}))[0] == 200


def _raw(port: int, data: bytes, *, shut: bool = False) -> tuple[int | None, bytes]:
    """Sends ``data`` on a fresh connection (``shut``: then closes the sending side) -> (status or
    None when the server closed without answering, everything it sent)."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        got = b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    return (int(got.split()[1]) if got.startswith(b"HTTP/1.1 ") else None), got


async def test_protocol_errors_are_400_from_uvicorn(port, caplog):
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    bad_length = head + b"Content-Length: ten\r\n\r\n{}"
    two_lengths = head + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
    # Over h11's 64 KiB limit for a request head, yet small enough to be read whole at once (bytes
    # left unread would turn the server's close into a reset that can swallow its answer).
    huge_header = head + b"X-Filler: " + b"a" * 70_000  # a head still incomplete past the limit
    bad_line = b"NOT AN HTTP REQUEST\r\n\r\n"
    for data in (bad_length, two_lengths, huge_header, bad_line):
        status, got = await asyncio.to_thread(_raw, port, data, shut=data is not huge_header)
        assert status == 400 and b"Invalid HTTP request" in got, (data[:80], got[:200])  # h11's, not a route's
    # A body shorter than its Content-Length, then the client stops sending: no answer is owed, and
    # the face neither crashes nor leaks the request.
    status, _ = await asyncio.to_thread(_raw, port, head + b'Content-Length: 100\r\n\r\n{"input":', shut=True)
    assert status in (None, 400)
    assert (await call(port, "POST", "/v1/embeddings", {"input": "still serving"}))[0] == 200
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


async def test_metrics_are_served(port):
    import http.client

    def get():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        out = r.status, r.getheader("content-type"), r.read().decode()
        conn.close()
        return out

    status, kind, text = await asyncio.to_thread(get)
    assert status == 200 and kind.startswith("text/plain") and "# TYPE" in text


async def test_a_chunked_body_over_the_limit_is_413(start_app, tiny_qwen3):
    app = await start_app("--model", str(tiny_qwen3), "--max-message-mb", "1")

    def send_chunked() -> tuple[int | None, bytes]:
        with socket.create_connection(("127.0.0.1", app.http.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            piece = b"a" * 65536
            # 16 x 64 KiB fill the 1 MiB limit and one more byte crosses it (no Content-Length to refuse
            # it by). Nothing more is sent: the server has read everything when it answers and closes
            # (unread bytes would make its close a reset that can swallow the answer).
            for _ in range(16):
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
            sock.sendall(b"1\r\na\r\n")
            got = b""
            while chunk := sock.recv(65536):
                got += chunk
        return (int(got.split()[1]) if got.startswith(b"HTTP/1.1 ") else None), got

    status, got = await asyncio.to_thread(send_chunked)
    assert status == 413 and b"--max-message-mb" in got, got[:300]
    assert (await call(app.http.port, "POST", "/v1/embeddings", {"input": "still serving"}))[0] == 200
