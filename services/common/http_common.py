"""What every service's HTTP face shares: OpenAI-shaped errors, bearer auth, JSON bodies with a
size limit, one access line per request, ``GET /health`` and ``GET /metrics``.

A face subclasses :class:`JsonFace`, lists its routes in ``routes()`` (each endpoint wrapped by
:meth:`JsonFace.endpoint`) and is started with ``start(host, port)`` on the service's event loop
(uvicorn through services/common/http_server.py). docs/architecture.md, "HTTP faces".

Errors have OpenAI's shape on every endpoint: ``{"error": {"message", "type", "param", "code"}}``
with the status of extmind/errors.py's table; ``type`` is ``invalid_request_error`` for 4xx,
``service_unavailable`` for 503 and ``server_error`` for other 5xx; ``code`` is the gRPC status
name in lower case (``invalid_argument``, ``not_found``, ``resource_exhausted`` ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Match, Route

from extmind.errors import ExtmindError, FailedPrecondition, InvalidArgument, Unauthenticated, Unavailable
from services.common.auth import HOW_TO_AUTHENTICATE, check_bearer
from services.common.http_server import HttpServer, start_http
from services.common.metrics import metrics_endpoint, observe_http

access_log = logging.getLogger("extmind.http")


class BodyTooLarge(InvalidArgument):
    """A body over the face's limit: never retryable, so 413 with code invalid_argument (not 429)."""

    http_status = 413


class BadField(InvalidArgument):
    """A request field of the wrong type or out of range; ``param`` names it (OpenAI's ``param``,
    which every face's error body carries)."""

    def __init__(self, param: str, message: str):
        super().__init__(message, param=param)


def _methods_of(request: Request) -> list[str]:
    """The methods the routes of ``request``'s path take (all of them: a path served by two routes,
    e.g. GET and DELETE, answers 405 with only the first one's in its Allow header)."""
    partial = (r for r in request.app.routes if r.matches(request.scope)[0] == Match.PARTIAL)
    return sorted({m for r in partial for m in getattr(r, "methods", None) or ()} - {"HEAD"})


def error_body(status: int, code: str, message: str, param: str | None = None) -> dict:
    """OpenAI's error shape; ``code`` is a gRPC status name (any case) or one of OpenAI's codes."""
    kind = "invalid_request_error" if status < 500 else "service_unavailable" if status == 503 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code.lower()}}


def error_response(status: int, code: str, message: str, param: str | None = None, **headers) -> JSONResponse:
    return JSONResponse(error_body(status, code, message, param), status_code=status, headers=headers or None)


def no_lone_surrogates(value, where: str = "the body") -> None:
    """Raises InvalidArgument when a string in ``value`` (JSON data) holds a lone surrogate
    (``"\\ud800"`` is valid JSON but no text: tokenizers and UTF-8 encoders fail on it)."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                raise InvalidArgument(f"{where} holds a lone UTF-16 surrogate (\\ud800-\\udfff): not text") from None
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)


async def read_json_object(request: Request, max_bytes: int, limit_flag: str = "--max-message-mb") -> dict:
    """The request's body as a JSON object (an empty body is ``{}``).

    Raises BodyTooLarge (413: a Content-Length or a streamed body over ``max_bytes``; the body
    is not read) and InvalidArgument (not UTF-8, not JSON, not an object, lone surrogates)."""

    def too_large(size: str) -> BodyTooLarge:
        return BodyTooLarge(
            f"the body has {size} bytes; this server takes at most {max_bytes} ({limit_flag}): send a smaller request"
        )

    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise too_large(declared)
    parts, size = [], 0
    async for chunk in request.stream():  # chunked bodies have no Content-Length: count as they come
        size += len(chunk)
        if size > max_bytes:
            raise too_large(f"more than {max_bytes}")
        parts.append(chunk)
    raw = b"".join(parts)
    if not raw.strip():
        return {}
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"the body is not UTF-8 ({exc})") from None
    try:
        body = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"the body is not valid JSON ({exc})") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise InvalidArgument(f"the body has a value this server cannot read ({exc})") from None
    if not isinstance(body, dict):
        raise InvalidArgument("the body must be a JSON object")
    no_lone_surrogates(body)
    return body


async def unless_disconnected(request: Request, work: Awaitable):
    """Awaits ``work`` (a whole answer that is not streamed); if the client hangs up first, cancels
    it (its ``finally`` blocks stop what it started) and raises ClientDisconnect (logged as 499).
    Streamed answers need no such guard: the server cancels their body iterator itself."""

    async def hung_up() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass  # the body has been read: the next message is the disconnect

    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(hung_up())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnect()
    finally:
        watcher.cancel()


Endpoint = Callable[[Request], Awaitable[Response | dict | list]]


class JsonFace:
    """Base of a service's HTTP face: subclasses give ``routes()``, ``ready()``, ``health()``.

    ``auth_token`` empty = no auth; ``max_body_bytes`` caps request bodies (413 beyond).
    ``draining`` (set by the app on shutdown) turns /health to 503."""

    label = "http"
    loading_message = "the service is still loading; retry when GET /health is 200"

    def __init__(self, *, auth_token: str = "", max_body_bytes: int = 64 * 1024 * 1024):
        self.draining = False
        self.auth_token = auth_token
        self.max_body = max_body_bytes
        self.port: int | None = None
        self._server: HttpServer | None = None

    # --- what a face defines ----------------------------------------------------------------------
    def routes(self) -> list[Route]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def health(self) -> dict:
        """The body of a 200 /health."""
        return {"status": "ok"}

    def error_code(self, exc: ExtmindError) -> str:
        """The OpenAI ``code`` of an engine error (default: its gRPC status name)."""
        return exc.code

    def error_message(self, exc: ExtmindError) -> str:
        """The message an HTTP caller reads (default: the engine's, which may name RPCs)."""
        return exc.message

    def unrouted(self, method: str, path: str) -> str:
        """The message of a 404 (say which endpoints exist; a 405 names the path's methods)."""
        return f"{method} {path} is not served"

    # --- shared -------------------------------------------------------------------------------------
    def app(self) -> Starlette:
        routes = [
            *self.routes(),
            Route("/health", self.endpoint(self._health, auth=False, ready=False), methods=["GET"]),
            Route("/metrics", self.endpoint(metrics_endpoint, auth=False, ready=False), methods=["GET"]),
        ]

        async def unrouted(request: Request, exc: HTTPException) -> Response:
            status = exc.status_code
            code = {404: "not_found", 405: "unimplemented"}.get(status, "invalid_argument")
            if status == 405:  # the path exists: say how to call it
                message = f"{request.method} {request.url.path}: use {' or '.join(_methods_of(request))}"
            else:
                message = self.unrouted(request.method, request.url.path) if status == 404 else str(exc.detail)
            _log(request, status, time.monotonic(), {}, self.label, route="unmatched")
            return error_response(status, code, message)

        return Starlette(routes=routes, exception_handlers={HTTPException: unrouted})

    async def _health(self, request: Request) -> Response:
        if not self.ready() or self.draining:
            return JSONResponse({"status": "draining" if self.draining else "loading"}, status_code=503)
        return JSONResponse(self.health())

    def error(self, exc: ExtmindError) -> JSONResponse:
        status = exc.http_status
        headers = {"connection": "close"} if isinstance(exc, BodyTooLarge) else {}  # its body was never read
        if status in (429, 503):  # the retryable answers (docs/contract.md) say when to try again
            headers["retry-after"] = "1"
        # An error that names the offending field (``param``, e.g. a request field) says so, as OpenAI does.
        message = self.error_message(exc)
        return error_response(status, self.error_code(exc), message, exc.param, **headers)

    def endpoint(self, fn: Endpoint, *, auth: bool = True, ready: bool = True):
        """Wraps ``fn(request) -> Response | JSON data``: bearer auth, the readiness guard, errors
        in OpenAI's shape (an ExtmindError with its status, anything else 500) and one access line
        (logger ``extmind.http``: method, path, status, duration_ms and ``request.state.access``;
        for a stream, when it ends)."""

        async def run(request: Request) -> Response:
            t0 = time.monotonic()
            request.state.access = extra = {}
            try:
                if auth and not check_bearer(request.headers.get("authorization", ""), self.auth_token):
                    raise Unauthenticated(HOW_TO_AUTHENTICATE)
                if ready and not self.ready():
                    raise Unavailable(self.loading_message)
                out = await fn(request)
                response = out if isinstance(out, Response) else JSONResponse(out)
            except ExtmindError as exc:
                response = self.error(exc)
                extra["error"] = exc.message
            except ClientDisconnect:
                _log(request, 499, t0, extra, self.label)
                return Response(status_code=499)
            except Exception as exc:  # noqa: BLE001 - the face keeps serving
                access_log.exception("http request failed", extra={"path": request.url.path})
                message = f"internal error ({type(exc).__name__}: {exc}); the service is still up"
                response = error_response(500, "internal", message)
            if isinstance(response, StreamingResponse):  # logged when the stream ends (or the client leaves)
                response.body_iterator = _logged(
                    response.body_iterator, request, response.status_code, t0, extra, self.label
                )
            else:
                _log(request, response.status_code, t0, extra, self.label)
            return response

        return run

    async def start(self, host: str, port: int) -> int:
        """Serves ``app()`` on ``host:port`` (0 = a free port); returns the bound port. Raises
        FailedPrecondition (one line naming the flag) when the port cannot be bound."""
        try:
            self._server = await start_http(self.app(), host, port, label=self.label)
        except OSError as exc:  # port taken, bad address: a readable line, not a traceback
            env = self.label.removesuffix("-http").upper() + "_HTTP_PORT"
            raise FailedPrecondition(
                f"cannot serve HTTP on {host}:{port} ({exc.strerror or exc}); "
                f"choose another --http-port / {env} (-1 = off)"
            ) from None
        self.port = self._server.port
        return self.port

    async def stop(self, grace: float = 5.0) -> None:
        self.draining = True
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None


async def _logged(body, request: Request, status: int, t0: float, extra: dict, label: str):
    try:
        async for chunk in body:
            yield chunk
    finally:
        _log(request, status, t0, extra, label)


def route_template(request: Request) -> str:
    """The matched route with its parameters as names (``/v1/memories/{memory_id}``): a metric
    label per route, never one per id."""
    for route in request.app.routes:
        match, _ = route.matches(request.scope)
        if match == Match.FULL:
            return getattr(route, "path_format", route.path)
    return "unmatched"


def _log(request: Request, status: int, t0: float, extra: dict, label: str, route: str | None = None) -> None:
    """The access line and the HTTP metrics of one answered request."""
    seconds = time.monotonic() - t0
    level = logging.ERROR if status >= 500 and status != 503 else logging.INFO
    path = request.url.path
    fields = {"method": request.method, "path": path, "status": status, "duration_ms": round(seconds * 1e3, 1)}
    access_log.log(level, "http", extra={**fields, **extra})
    observe_http(label.removesuffix("-http"), route or route_template(request), request.method, status, seconds)
