"""gRPC channels to extmind services, for clients and for the services calling each other.

Targets: ``host:port``, ``grpc://host:port``, ``grpcs://host:port`` (TLS), ``unix:/path``, gRPC's
own schemes (``ipv4:``/``ipv6:`` address lists are checked entry by entry).
Message limits are raised (KV memories are large; the default 4 MiB is too small).
"""

from __future__ import annotations

import ipaddress
import os
import re

import grpc

MAX_MESSAGE_BYTES = 256 * 1024 * 1024
OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # A peer that restarts is found again within ~2 s (gRPC's default backoff grows to 120 s, so a
    # generator could answer UNAVAILABLE for a minute after its memory service was back).
    ("grpc.initial_reconnect_backoff_ms", 500),
    ("grpc.min_reconnect_backoff_ms", 1_000),
    ("grpc.max_reconnect_backoff_ms", 2_000),
]


# gRPC's own name schemes, passed through as they are (grpc/doc/naming.md), as is any scheme:///.
_SCHEMES = ("unix:", "unix-abstract:", "dns:", "ipv4:", "ipv6:", "vsock:")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*:///")
_HOST_PORT = re.compile(r"(\[[0-9A-Za-z:.%]+\]|[A-Za-z0-9_.-]+)(:([0-9]{1,5}))?")
_V4_ENTRY = re.compile(r"([0-9.]+):([0-9]{1,5})")
_V6_ENTRY = re.compile(r"\[([0-9A-Za-z:.%]+)\]:([0-9]{1,5})")
_FORMS = "use host:port, grpc://host:port, grpcs://host[:port] (TLS), unix:/path or a scheme:/// of gRPC's"


def parse_target(url: str) -> tuple[str, bool]:
    """-> (grpc target, use TLS). Raises ValueError naming the forms taken for anything else (an
    HTTP URL, a host without a port, a port past 65535, a typo such as ``http//host``): gRPC would
    take those as a host name (or wrap the port) and fail later with an error that does not say
    what to change. After grpc:// or grpcs:// the port may be left out (gRPC's default, 443)."""
    url = url.strip()
    if url.lower().startswith(("http://", "https://")):
        raise ValueError(f"{url!r} is an HTTP URL; gRPC targets look like host:port or grpc://host:port")
    scheme = url[: url.find("://") + 3].lower() if "://" in url else ""
    secure = scheme == "grpcs://"
    target = url[len(scheme) :].rstrip("/") if scheme in ("grpc://", "grpcs://") else url.rstrip("/")
    if target.lower().startswith(("ipv4:", "ipv6:")):
        _check_addresses(url, target)
        return target, secure
    if target.lower().startswith(_SCHEMES) or _URI.match(target):
        return target, secure
    hp = _HOST_PORT.fullmatch(target)
    port = hp and hp.group(3)
    if port and int(port) > 65535:
        raise ValueError(f"{url!r}: port {int(port)} is past 65535")
    if not hp or (port is None and scheme not in ("grpc://", "grpcs://")):
        raise ValueError(f"{url!r} is not a gRPC target: {_FORMS}")
    return target, secure


def _check_addresses(url: str, target: str) -> None:
    """gRPC's ``ipv4:a.b.c.d:port[,...]`` / ``ipv6:[addr]:port[,...]`` lists (grpc/doc/naming.md;
    gRPC refuses an entry without a port). Raises ValueError naming the entry that is not one:
    gRPC would take the target and fail at the first call with a resolver error."""
    v6 = target[:5].lower() == "ipv6:"
    rest = target[5:]
    for entry in (rest[3:] if rest.startswith("///") else rest).split(","):  # ipv4:///a.b.c.d:port too
        m = (_V6_ENTRY if v6 else _V4_ENTRY).fullmatch(entry)
        try:
            ok = bool(m) and 0 < int(m.group(2)) <= 65535
            ok = ok and bool((ipaddress.IPv6Address if v6 else ipaddress.IPv4Address)(m.group(1)))
        except ValueError:
            ok = False
        if not ok:
            form = "ipv6:[addr]:port" if v6 else "ipv4:a.b.c.d:port"
            raise ValueError(f"{url!r}: {entry!r} is not an address of {form} (entries separated by commas)")


def auth_metadata(token: str | None = None) -> tuple[tuple[str, str], ...]:
    """``authorization`` metadata for ``token`` (default: $EXTMIND_AUTH_TOKEN), or none."""
    token = os.environ.get("EXTMIND_AUTH_TOKEN", "") if token is None else token
    return (("authorization", f"Bearer {token}"),) if token else ()


def _credentials(root_certs: bytes | None):
    if root_certs is None and os.environ.get("EXTMIND_TLS_CA"):
        with open(os.environ["EXTMIND_TLS_CA"], "rb") as f:
            root_certs = f.read()
    return grpc.ssl_channel_credentials(root_certificates=root_certs)


def aio_channel(url: str, *, tls: bool | None = None, root_certs: bytes | None = None) -> grpc.aio.Channel:
    target, secure = parse_target(url)
    if tls or (tls is None and secure):
        return grpc.aio.secure_channel(target, _credentials(root_certs), options=OPTIONS)
    return grpc.aio.insecure_channel(target, options=OPTIONS)


def sync_channel(url: str, *, tls: bool | None = None, root_certs: bytes | None = None) -> grpc.Channel:
    target, secure = parse_target(url)
    if tls or (tls is None and secure):
        return grpc.secure_channel(target, _credentials(root_certs), options=OPTIONS)
    return grpc.insecure_channel(target, options=OPTIONS)
