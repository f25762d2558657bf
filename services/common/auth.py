"""The one bearer-token check, shared by the gRPC interceptor and the HTTP faces (http_common.py)."""

from __future__ import annotations

import hmac

# What a caller without the right token is told, on either face.
HOW_TO_AUTHENTICATE = (
    "missing or wrong bearer token: send 'authorization: Bearer <token>' with the token "
    "the service was started with (EXTMIND_AUTH_TOKEN)"
)


def check_bearer(header_value: str | bytes | None, token: str) -> bool:
    """Whether an ``authorization`` header (gRPC metadata or HTTP) is ``Bearer <token>``; the
    scheme's case does not matter (``bearer``, as HTTP's auth schemes are case-insensitive).

    Compares the token in constant time. An empty ``token`` means auth is off: every caller passes."""
    if not token:
        return True
    given = header_value.encode() if isinstance(header_value, str) else (header_value or b"")
    scheme, _, credentials = given.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(credentials, token.encode())
