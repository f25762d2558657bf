"""Requests on one keep-alive HTTP connection, for running services' HTTP faces side by side: a
``GET /health`` round trip (any service), and for a generator when the first server-sent event and
the end of a streamed completion reach the client.

    python -m bench.http_keepalive --url 127.0.0.1:8001 [--url 127.0.0.1:8011] [--rounds 20] [--memory ID]
    python -m bench.http_keepalive --url 127.0.0.1:8000 --url 127.0.0.1:8010 --health-only

A client that keeps its connection open (the ``openai`` package, any HTTP/1.1 pool) sends its
second and later requests on it; those are the ones measured (each connection's first request is
left out: Linux acknowledges a fresh connection's packets at once, later ones up to ~40 ms late,
which is what Nagle's algorithm on the server would wait for). The request is the default model's
question format, greedy, ``max_tokens`` 12, ``stream: true``; rounds alternate between the URLs.
Times are from sending the request: "first event" when the first ``data:`` line arrived (after
the response headers), "end" when the last chunk did. Raw sockets, so no client library buffers.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time

PROMPT = "Question: What city does Velmar Dorisan live in?\nAnswer:"


def request_bytes(memory: str | None, max_tokens: int) -> bytes:
    body = {"max_tokens": max_tokens, "temperature": 0, "stream": True, "prompt": PROMPT}
    if memory:
        body["extmind"] = {"memory_ids": [memory]}
    data = json.dumps(body).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


def one(sock: socket.socket, req: bytes) -> tuple[float, float, bool]:
    """One streamed request on an open connection -> (ms to the first event, ms to the end,
    whether the first event came in the same read as the end)."""
    t0 = time.perf_counter()
    sock.sendall(req)
    buf, first, reads = b"", None, 0
    while not buf.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's last chunk
        got = sock.recv(65536)
        if not got:
            raise ConnectionError("the server closed the connection mid-answer")
        buf += got
        reads += 1
        if first is None and b"data: " in buf:
            first, first_read = (time.perf_counter() - t0) * 1e3, reads
    if b" 200 " not in buf.split(b"\r\n", 1)[0]:
        raise RuntimeError(buf.split(b"\r\n\r\n", 2)[-1][:300].decode(errors="replace"))
    return first, (time.perf_counter() - t0) * 1e3, first_read == reads


def health(sock: socket.socket) -> float:
    """One ``GET /health`` on an open connection -> ms to its whole answer."""
    t0 = time.perf_counter()
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: bench\r\n\r\n")
    buf = b""
    while b"\r\n\r\n" not in buf or len(buf.split(b"\r\n\r\n", 1)[1]) < _length(buf):
        got = sock.recv(65536)
        if not got:
            raise ConnectionError("the server closed the connection mid-answer")
        buf += got
    return (time.perf_counter() - t0) * 1e3


def _length(buf: bytes) -> int:
    for line in buf.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    raise RuntimeError("an answer without content-length")


def _summary(ms: list[float]) -> str:
    return f"{statistics.median(ms):6.1f} ({min(ms):.1f}-{max(ms):.1f})"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.http_keepalive", description=__doc__.splitlines()[0])
    p.add_argument("--url", action="append", required=True, help="host:port of a generator's HTTP face (repeatable)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--memory", help="memory id to attach (made by the same model)")
    p.add_argument("--max-tokens", type=int, default=12)
    p.add_argument("--health-only", action="store_true", help="only GET /health (an embedder, a memory service)")
    a = p.parse_args(argv)
    req = request_bytes(a.memory, a.max_tokens)
    conns = {}
    for url in a.url:
        host, port = url.rsplit(":", 1)
        conns[url] = socket.create_connection((host, int(port)), timeout=60)
        health(conns[url])  # the connection's first request: not measured
    healths = {url: [] for url in a.url}
    for _ in range(a.rounds):
        for url in a.url:
            healths[url].append(health(conns[url]))
    print(f"GET /health, {a.rounds} per URL on one keep-alive connection, ms (median, min-max)")
    for url, ms in healths.items():
        print(f"  {url:<22} {_summary(ms)}")
    if a.health_only:
        return
    times = {url: [] for url in a.url}
    for _ in range(a.rounds):
        for url in a.url:
            times[url].append(one(conns[url], req))
    print(
        f"{a.rounds} streamed requests per URL on one keep-alive connection, ms (median, min-max); "
        "bunched: the first event came in the same read as the end"
    )
    for url, ts in times.items():
        firsts, ends = [t[0] for t in ts], [t[1] for t in ts]
        print(
            f"  {url:<22} first event {_summary(firsts)}   end {_summary(ends)}"
            f"   bunched {sum(t[2] for t in ts)}/{len(ts)}"
        )


if __name__ == "__main__":
    main()
