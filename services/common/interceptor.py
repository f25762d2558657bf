"""Server interceptors: bearer-token auth, the readiness guard, and one place that maps
exceptions to status codes and writes the access log.

Engines raise ``extmind.errors`` exceptions; this turns them into the matching gRPC status
(``code``) with the engine's human message. Anything else is INTERNAL (logged with its
traceback), and the service keeps serving. Health and reflection pass every interceptor.

Every other call gets one access line (logger ``extmind.rpc``, message ``rpc``) when it ends:
``method``, ``code``, ``duration_ms`` and whatever the servicer added with ``note_access``
(e.g. token counts). The same place moves the gRPC metrics of services/common/metrics.py
(calls by code, latency, in flight).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time

import grpc
from google.protobuf.message import DecodeError

from extmind.errors import ExtmindError
from services.common.auth import HOW_TO_AUTHENTICATE, check_bearer
from services.common.metrics import GRPC_IN_FLIGHT, observe_grpc, split_method

log = logging.getLogger("extmind.rpc")

# Probes and discovery work without a token (container health checks, grpcurl list).
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


# A status message travels in the trailers, which gRPC caps at 16 KiB: a message echoing a huge
# input (a 100 000-character id) would turn into RESOURCE_EXHAUSTED on the client. Keep it short.
MAX_STATUS_MESSAGE_CHARS = 2000


def _shorten(message: str) -> str:
    if len(message) <= MAX_STATUS_MESSAGE_CHARS:
        return message
    cut = len(message) - MAX_STATUS_MESSAGE_CHARS + 200
    return message[:1000] + f" …[{cut} characters cut]… " + message[-800:]


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    code, message = _status_and_message(exc)
    return code, _shorten(message)


def _status_and_message(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ExtmindError):
        return grpc.StatusCode[exc.code], exc.message
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the call took longer than its deadline"
    if isinstance(exc, NotImplementedError):  # the generated base servicer's default
        return grpc.StatusCode.UNIMPLEMENTED, "this RPC is not implemented by this server"
    if isinstance(exc, DecodeError):  # a streamed request message is read inside the handler
        return (
            grpc.StatusCode.INVALID_ARGUMENT,
            f"a request message could not be parsed ({exc}); send the method's type",
        )
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory for this request; send less at once"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}: {exc}); the service is still up"


# The current call's extra access-log fields; the servicer runs in the wrapper's task, so it
# sees the dict the wrapper put here.
_ACCESS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("extmind_access", default=None)


def note_access(**fields) -> None:
    """Adds ``fields`` (e.g. prompt_tokens=12) to the current call's access line; a no-op
    outside an intercepted call."""
    extra = _ACCESS.get()
    if extra is not None:
        extra.update(fields)


def _log_access(
    method: str,
    code: grpc.StatusCode,
    t0: float,
    extra: dict | None = None,
    error: str = "",
    exc: BaseException | None = None,
) -> None:
    seconds = time.monotonic() - t0
    observe_grpc(method, code.name, seconds)
    fields = {
        "method": method,
        "code": code.name,
        "duration_ms": round(seconds * 1000, 1),
        **(extra or {}),
    }
    if error:
        fields["error"] = error
    level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
    log.log(level, "rpc", extra=fields, exc_info=exc if code == grpc.StatusCode.INTERNAL else None)


def _code_of(context) -> grpc.StatusCode:
    """The code an aborted call ends with (UNKNOWN where this grpc cannot tell)."""
    try:
        code = context.code()
    except (AttributeError, NotImplementedError):
        return grpc.StatusCode.UNKNOWN
    return code if isinstance(code, grpc.StatusCode) else grpc.StatusCode.UNKNOWN


def _wrap(behavior, method: str, response_streaming: bool):
    in_flight = GRPC_IN_FLIGHT.labels(*split_method(method))

    async def _fail(context, exc, t0, extra):
        code, message = _status_of(exc)
        _log_access(method, code, t0, extra, message, exc)
        await context.abort(code, message)

    if response_streaming:

        async def stream_wrapper(request, context):
            t0, extra = time.monotonic(), {}
            _ACCESS.set(extra)
            in_flight.inc()
            try:
                async for item in behavior(request, context):
                    yield item
            except grpc.aio.AbortError:
                _log_access(method, _code_of(context), t0, extra)
                raise
            except (asyncio.CancelledError, GeneratorExit):
                _log_access(method, grpc.StatusCode.CANCELLED, t0, extra)
                raise
            except Exception as exc:  # noqa: BLE001 - the point is to catch everything
                await _fail(context, exc, t0, extra)
            else:
                _log_access(method, grpc.StatusCode.OK, t0, extra)
            finally:
                in_flight.dec()

        return stream_wrapper

    async def unary_wrapper(request, context):
        t0, extra = time.monotonic(), {}
        _ACCESS.set(extra)
        in_flight.inc()
        try:
            out = await behavior(request, context)
        except grpc.aio.AbortError:
            _log_access(method, _code_of(context), t0, extra)
            raise
        except asyncio.CancelledError:
            _log_access(method, grpc.StatusCode.CANCELLED, t0, extra)
            raise
        except Exception as exc:  # noqa: BLE001
            await _fail(context, exc, t0, extra)
        else:
            _log_access(method, grpc.StatusCode.OK, t0, extra)
            return out
        finally:
            in_flight.dec()

    return unary_wrapper


def _parsing(behavior, deserialize, response_streaming: bool):
    """``behavior`` taking the request's bytes and parsing them itself: gRPC parses a unary
    request before any handler runs and answers a message it cannot parse with UNKNOWN; parsed
    here, inside the wrapper, a DecodeError is INVALID_ARGUMENT as in a streamed request."""
    if deserialize is None:
        return behavior
    if response_streaming:

        async def parse_then_stream(raw, context):
            async for item in behavior(deserialize(raw), context):
                yield item

        return parse_then_stream

    async def parse_then_call(raw, context):
        return await behavior(deserialize(raw), context)

    return parse_then_call


def _rewrap(handler: grpc.RpcMethodHandler, wrap) -> grpc.RpcMethodHandler:
    if handler is None:
        return None
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(_parsing(handler.unary_unary, handler.request_deserializer, False), False),
            None,
            handler.response_serializer,
        )
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(
            wrap(_parsing(handler.unary_stream, handler.request_deserializer, True), True),
            None,
            handler.response_serializer,
        )
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(
            wrap(handler.stream_unary, False), handler.request_deserializer, handler.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        wrap(handler.stream_stream, True), handler.request_deserializer, handler.response_serializer
    )


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method.startswith(_OPEN_PREFIXES):
            return handler
        return _rewrap(handler, lambda b, streaming: _wrap(b, details.method, streaming))


def _refusing(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, method: str
) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers ``code`` without running it (and
    writes the access line: these calls never reach the error interceptor's wrapper)."""

    def refuse(streaming):
        if streaming:

            async def refuse_stream(request, context):
                _log_access(method, code, time.monotonic())
                await context.abort(code, message)
                yield  # pragma: no cover - makes this an async generator

            return refuse_stream

        async def refuse_unary(request, context):
            _log_access(method, code, time.monotonic())
            await context.abort(code, message)

        return refuse_unary

    return _rewrap(handler, lambda b, streaming: refuse(streaming))


class ReadinessInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAVAILABLE to every call but health and reflection until ``ready`` is set.

    The one guard for "still starting": servicers need no check of their own. ``what`` names the
    service, ``loading`` what its start-up does (for the message)."""

    def __init__(self, what: str, loading: str):
        self.ready = False
        self._message = f"{what} is loading ({loading}); retry shortly (health says SERVING when ready)"

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if self.ready or details.method.startswith(_OPEN_PREFIXES):
            return handler
        return _refusing(handler, grpc.StatusCode.UNAVAILABLE, self._message, details.method)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call but health and reflection."""

    def __init__(self, token: str):
        self._token = token

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method.startswith(_OPEN_PREFIXES):
            return handler
        if check_bearer(dict(details.invocation_metadata or ()).get("authorization"), self._token):
            return handler
        return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, HOW_TO_AUTHENTICATE, details.method)
