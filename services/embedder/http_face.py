"""The HTTP face (``--http-port``) for clients that speak HTTP, sharing the engine's queue.

    POST /embed           {"texts"|"input": [...], "model", "input_type", "instruction", "dimensions",
                           "normalize", "truncate"} -> {"embeddings", "model", "dimensions", "token_counts"}
                           (plain /embed is the document path)
    POST /v1/embeddings   OpenAI-compatible (input: a string, a list of strings, a list of token ids or a
                          list of such lists; model, dimensions, encoding_format float|base64)
    GET  /v1/models       OpenAI-compatible model list
    GET  /health          200 when ready, 503 while loading or draining
    GET  /info            the served models and batching limits

A small HTTP/1.1 server on asyncio streams (keep-alive, Content-Length bodies): enough for these
JSON endpoints without another dependency.

Errors have OpenAI's shape on every endpoint: ``{"error": {"message", "type", "param", "code"}}``
with the status of extmind/errors.py's table; ``type`` is ``invalid_request_error`` for 4xx,
``service_unavailable`` for 503 and ``server_error`` for other 5xx; ``code`` is the gRPC status name
in lower case (``invalid_argument``, ``not_found``, ``resource_exhausted`` ...), except an unknown
model, which is OpenAI's ``model_not_found``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time

import numpy as np

from extmind.errors import ExtmindError, InvalidArgument, NotFound, Unauthenticated, Unavailable
from services.common.auth import HOW_TO_AUTHENTICATE, check_bearer
from services.embedder.engine import DOCUMENT, QUERY, EmbedderEngine

log = logging.getLogger("extmind.embedder.http")

_REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    411: "Length Required",
    413: "Payload Too Large",
    429: "Too Many Requests",
    499: "Client Closed Request",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}


class _HttpError(Exception):
    """A failure of the HTTP layer itself (not an engine error): its status and gRPC-style code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_body(status: int, code: str, message: str) -> dict:
    """OpenAI's error shape; ``code`` is a gRPC status name (any case) or one of OpenAI's codes."""
    kind = "invalid_request_error" if status < 500 else "service_unavailable" if status == 503 else "server_error"
    return {"error": {"message": message, "type": kind, "param": None, "code": code.lower()}}


def _openai_input(body: dict) -> tuple[list[str] | None, list[list[int]] | None]:
    """OpenAI's ``input``: a string, strings, token ids, or lists of token ids -> (texts, token lists)."""
    value = body.get("input")
    if isinstance(value, str):
        return [value], None
    if isinstance(value, list) and value:
        if all(isinstance(t, str) for t in value):
            return value, None
        if all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return None, [value]
        if all(isinstance(t, list) for t in value):
            for i, ids in enumerate(value):
                bad = next((t for t in ids if not isinstance(t, int) or isinstance(t, bool)), None)
                if bad is not None or not ids:
                    raise InvalidArgument(
                        f"'input'[{i}] must be a non-empty list of integer token ids"
                        + (f" ({bad!r} is not one)" if bad is not None else "")
                    )
            return None, value
    raise InvalidArgument(
        "'input' must be a non-empty string, a list of strings, a list of token ids or a list of lists of token ids"
    )


def _texts(body: dict, *keys: str) -> list[str]:
    for key in keys:
        value = body.get(key)
        if value is None or value == []:
            continue
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(t, str) for t in value):
            return value
        raise InvalidArgument(f"'{key}' must be a string or a list of strings (token ids: POST /v1/embeddings)")
    raise InvalidArgument(f"send the texts in {' or '.join(repr(k) for k in keys)} as a non-empty list of strings")


def _int(body: dict, key: str) -> int:
    value = body.get(key) or 0
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise InvalidArgument(f"'{key}' must be a non-negative integer")
    return value


def _input_type(body: dict) -> str:
    value = (body.get("input_type") or DOCUMENT).lower()
    if value not in (DOCUMENT, QUERY):
        raise InvalidArgument("'input_type' is 'document' (default) or 'query'")
    return value


class HttpFace:
    def __init__(self, *, auth_token: str = "", max_body_bytes: int = 64 * 1024 * 1024):
        self.engine: EmbedderEngine | None = None  # None while loading: /health answers 503
        self.draining = False
        self.auth_token = auth_token
        self.max_body = max_body_bytes
        self._server: asyncio.AbstractServer | None = None
        self.port: int | None = None

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._connection, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("http face listening", extra={"address": f"{host}:{self.port}"})
        return self.port

    async def stop(self) -> None:
        self.draining = True
        if self._server:
            self._server.close()
            await self._server.wait_closed()

    # --- protocol -------------------------------------------------------------------------------
    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                try:
                    method, target, version = line.decode("latin-1").split()
                except ValueError:
                    await self._send(
                        writer, 400, error_body(400, "invalid_argument", "malformed request line"), close=True
                    )
                    return
                headers = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    k, _, v = h.decode("latin-1").partition(":")
                    headers[k.strip().lower()] = v.strip()
                keep = (version == "HTTP/1.1" and headers.get("connection", "").lower() != "close") or headers.get(
                    "connection", ""
                ).lower() == "keep-alive"
                if "chunked" in headers.get("transfer-encoding", "").lower():
                    await self._send(
                        writer, 411, error_body(411, "invalid_argument", "send a Content-Length body"), close=True
                    )
                    return
                length = int(headers.get("content-length") or 0)
                if length > self.max_body:
                    # Too large is never retryable: 413, not 429.
                    await self._send(
                        writer,
                        413,
                        error_body(
                            413,
                            "invalid_argument",
                            f"the body has {length} bytes; this server takes at most "
                            f"{self.max_body} (--max-message-mb): send fewer inputs per request",
                        ),
                        close=True,
                    )
                    return
                body = await reader.readexactly(length) if length else b""
                status, payload = await self._handle(method, target.split("?")[0], headers, body)
                await self._send(writer, status, payload, close=not keep)
                if not keep:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def _send(self, writer, status: int, payload, *, close: bool) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: {'close' if close else 'keep-alive'}\r\n\r\n"
        )
        writer.write(head.encode() + data)
        await writer.drain()

    async def _handle(self, method: str, path: str, headers: dict, body: bytes):
        started = time.perf_counter()
        try:
            if path == "/health":
                if self.engine is None or self.draining:
                    return 503, {"status": "draining" if self.draining else "loading"}
                return 200, {"status": "ok", "models": [m.name for m in self.engine.models]}
            if not check_bearer(headers.get("authorization", ""), self.auth_token):
                raise Unauthenticated(HOW_TO_AUTHENTICATE)
            routes = {
                ("POST", "/embed"): self._embed,
                ("POST", "/v1/embeddings"): self._openai,
                ("GET", "/v1/models"): self._models,
                ("GET", "/info"): self._info,
            }
            handler = routes.get((method, path))
            if handler is None:
                known = {p for _, p in routes} | {"/health"}
                raise _HttpError(
                    405 if path in known else 404,
                    "unimplemented" if path in known else "not_found",
                    f"{method} {path} is not served; endpoints: POST /embed, POST /v1/embeddings, "
                    "GET /v1/models, GET /info, GET /health",
                )
            if self.engine is None:
                raise Unavailable("the embedder is still loading its models; retry when GET /health is 200")
            request = {}
            if method == "POST":
                try:
                    request = json.loads(body or b"{}")
                except json.JSONDecodeError as exc:
                    raise InvalidArgument(f"the body is not valid JSON ({exc})") from None
                if not isinstance(request, dict):
                    raise InvalidArgument("the body must be a JSON object")
            return 200, await handler(request)
        except _HttpError as exc:
            return exc.status, error_body(exc.status, exc.code, exc.message)
        except ExtmindError as exc:
            # The engine's only NotFound is an unknown model: OpenAI's own code, which clients match on.
            code = "model_not_found" if isinstance(exc, NotFound) else exc.code
            return exc.http_status, error_body(exc.http_status, code, exc.message)
        except Exception as exc:  # noqa: BLE001 - the face keeps serving
            log.exception("http request failed", extra={"path": path})
            return 500, error_body(
                500, "internal", f"internal error ({type(exc).__name__}: {exc}); the service is still up"
            )
        finally:
            log.debug("http", extra={"method": method, "path": path, "ms": (time.perf_counter() - started) * 1e3})

    # --- endpoints ------------------------------------------------------------------------------
    async def _embed(self, body: dict) -> dict:
        r = await self.engine.embed(
            _texts(body, "texts", "input"),
            model=body.get("model") or "",
            input_type=_input_type(body),
            instruction=body.get("instruction") or "",
            dimensions=_int(body, "dimensions"),
            normalize=body.get("normalize", True) is not False,
            truncate=body.get("truncate", True) is not False,
        )
        return {
            "embeddings": r.vectors.tolist(),
            "model": r.model,
            "dimensions": r.dimensions,
            "token_counts": r.token_counts,
        }

    async def _openai(self, body: dict) -> dict:
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise InvalidArgument("'encoding_format' is 'float' or 'base64'")
        texts, token_inputs = _openai_input(body)
        r = await self.engine.embed(
            texts,
            token_inputs=token_inputs,
            model=body.get("model") or "",
            input_type=_input_type(body),
            instruction=body.get("instruction") or "",
            dimensions=_int(body, "dimensions"),
        )

        def encode(v: np.ndarray):
            return base64.b64encode(v.astype("<f4").tobytes()).decode() if fmt == "base64" else v.tolist()

        tokens = sum(r.token_counts)
        return {
            "object": "list",
            "model": r.model,
            "data": [{"object": "embedding", "index": i, "embedding": encode(v)} for i, v in enumerate(r.vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    async def _models(self, body: dict) -> dict:
        return {
            "object": "list",
            "data": [
                {"id": m["name"], "object": "model", "owned_by": "extmind", "kind": m["kind"], "loaded": m["loaded"]}
                for m in self.engine.model_list()
            ],
        }

    async def _info(self, body: dict) -> dict:
        return self.engine.info()
