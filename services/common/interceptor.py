"""Server interceptors: bearer-token auth, the readiness guard, and one place that maps
exceptions to status codes.

Engines raise ``extmind.errors`` exceptions; this turns them into the matching gRPC status
(``code``) with the engine's human message. Anything else is INTERNAL (logged with its
traceback), and the service keeps serving. Health and reflection pass every interceptor.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from extmind.errors import ExtmindError
from services.common.auth import HOW_TO_AUTHENTICATE, check_bearer

log = logging.getLogger("extmind.rpc")

# Probes and discovery work without a token (container health checks, grpcurl list).
_OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, ExtmindError):
        return grpc.StatusCode[exc.code], exc.message
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "the call took longer than its deadline"
    if isinstance(exc, NotImplementedError):  # the generated base servicer's default
        return grpc.StatusCode.UNIMPLEMENTED, "this RPC is not implemented by this server"
    if isinstance(exc, MemoryError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, "the server ran out of memory for this request; send less at once"
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}: {exc}); the service is still up"


def _wrap(behavior, method: str, response_streaming: bool):
    async def _fail(context, exc):
        code, message = _status_of(exc)
        level = logging.ERROR if code == grpc.StatusCode.INTERNAL else logging.INFO
        log.log(level, "rpc failed", extra={"method": method, "code": code.name, "error": message},
                exc_info=exc if code == grpc.StatusCode.INTERNAL else None)
        await context.abort(code, message)

    if response_streaming:
        async def stream_wrapper(request, context):
            try:
                async for item in behavior(request, context):
                    yield item
            except (grpc.aio.AbortError, asyncio.CancelledError):
                raise
            except Exception as exc:  # noqa: BLE001 - the point is to catch everything
                await _fail(context, exc)
        return stream_wrapper

    async def unary_wrapper(request, context):
        try:
            return await behavior(request, context)
        except (grpc.aio.AbortError, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001
            await _fail(context, exc)
    return unary_wrapper


def _rewrap(handler: grpc.RpcMethodHandler, wrap) -> grpc.RpcMethodHandler:
    if handler is None:
        return None
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(wrap(handler.unary_unary, False),
                                                   handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(wrap(handler.unary_stream, True),
                                                    handler.request_deserializer, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(wrap(handler.stream_unary, False),
                                                    handler.request_deserializer, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(wrap(handler.stream_stream, True),
                                                 handler.request_deserializer, handler.response_serializer)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if details.method.startswith(_OPEN_PREFIXES):
            return handler
        return _rewrap(handler, lambda b, streaming: _wrap(b, details.method, streaming))


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers ``code`` without running it."""
    def refuse(streaming):
        if streaming:
            async def refuse_stream(request, context):
                await context.abort(code, message)
                yield  # pragma: no cover - makes this an async generator
            return refuse_stream

        async def refuse_unary(request, context):
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
        return _refusing(handler, grpc.StatusCode.UNAVAILABLE, self._message)


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
        return _refusing(handler, grpc.StatusCode.UNAUTHENTICATED, HOW_TO_AUTHENTICATE)
