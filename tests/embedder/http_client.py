"""A minimal JSON client for the embedder's HTTP face, shared by its tests."""

from __future__ import annotations

import asyncio
import http.client
import json


def request_with_headers(port: int, method: str, path: str, body=None, raw: bytes | None = None):
    """-> (HTTP status, decoded JSON body, response headers with lower-case names) of one request
    to 127.0.0.1:``port``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    resp = conn.getresponse()
    out = resp.status, json.loads(resp.read() or b"null"), {k.lower(): v for k, v in resp.getheaders()}
    conn.close()
    return out


def request(port: int, method: str, path: str, body=None, raw: bytes | None = None):
    """-> (HTTP status, decoded JSON body) of one request to 127.0.0.1:``port``."""
    return request_with_headers(port, method, path, body, raw)[:2]


async def call(port, method, path, body=None, raw=None):
    return await asyncio.to_thread(request, port, method, path, body, raw)
