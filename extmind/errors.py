"""Errors that engines raise, and the one table that maps them to gRPC and HTTP.

Engines know nothing of gRPC or HTTP: they raise these, with a message that tells a person what
to change. The gRPC interceptor turns ``code`` into the status (``grpc.StatusCode[code]``); an
HTTP face answers ``http_status``. Calls to another service turn its RPC error back into one of
these with :func:`from_rpc_error`. Which statuses are retryable is in docs/contract.md.
"""

from __future__ import annotations


class ExtmindError(Exception):
    """Base class: ``code`` is the gRPC status name, ``http_status`` the HTTP answer, ``param``
    the request field at fault when there is one (the HTTP faces' OpenAI ``param``)."""

    code = "INTERNAL"
    http_status = 500

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidArgument(ExtmindError):
    code, http_status = "INVALID_ARGUMENT", 400


class NotFound(ExtmindError):
    code, http_status = "NOT_FOUND", 404


class AlreadyExists(ExtmindError):
    code, http_status = "ALREADY_EXISTS", 409


class FailedPrecondition(ExtmindError):
    code, http_status = "FAILED_PRECONDITION", 409


class ResourceExhausted(ExtmindError):
    """Only for overload (a full queue): clients retry it. A request too large is InvalidArgument."""

    code, http_status = "RESOURCE_EXHAUSTED", 429


class Unavailable(ExtmindError):
    code, http_status = "UNAVAILABLE", 503


class Unauthenticated(ExtmindError):
    code, http_status = "UNAUTHENTICATED", 401


class Cancelled(ExtmindError):
    code, http_status = "CANCELLED", 499


class DeadlineExceeded(ExtmindError):
    code, http_status = "DEADLINE_EXCEEDED", 504


class Unimplemented(ExtmindError):
    code, http_status = "UNIMPLEMENTED", 501


class Internal(ExtmindError):
    code, http_status = "INTERNAL", 500


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        ResourceExhausted,
        Unavailable,
        Unauthenticated,
        Cancelled,
        DeadlineExceeded,
        Unimplemented,
        Internal,
    )
}

# What a dependency's answer means for *our* caller: these describe the request, so they pass
# through; anything else (down, timed out, our token refused, unknown) makes the dependency unusable.
_PASS_THROUGH = {
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "INTERNAL",
}


def ours_or_internal(e: Exception, what: str) -> ExtmindError:
    """``e`` as the error a request ends with: ours as it is, anything else Internal ("what: e")."""
    return e if isinstance(e, ExtmindError) else Internal(f"{what}: {e}")


def from_code(code: str, message: str) -> ExtmindError:
    """The error of gRPC status name ``code`` (e.g. ``"NOT_FOUND"``); unknown names give Internal."""
    return _BY_CODE.get(code, Internal)(message)


def from_rpc_error(exc, *, peer: str, as_dependency: bool, hint: str = "") -> ExtmindError:
    """Turns a ``grpc.RpcError`` from a call to ``peer`` (e.g. "memory service at host:port") into ours.

    ``as_dependency=True`` is for a service calling another one: statuses that describe the request
    keep their code, every other status becomes Unavailable naming ``peer`` (and ``hint``, what to
    start or configure). ``as_dependency=False`` is for the public clients: the code is kept.
    """
    code_obj = exc.code() if hasattr(exc, "code") else None
    code = getattr(code_obj, "name", "UNKNOWN")
    detail = exc.details() if hasattr(exc, "details") else str(exc)
    if as_dependency and code not in _PASS_THROUGH:
        tail = f"; {hint}" if hint else ""
        return Unavailable(f"{peer} is unavailable ({code}: {detail}){tail}")
    return from_code(code, detail)
