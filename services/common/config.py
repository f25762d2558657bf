"""Flags with environment-variable fallbacks: ``--port`` falls back to ``MEMORY_PORT`` etc.

Precedence: command-line flag > environment variable > default. Every flag's help names its
variable, so ``python -m services.X --help`` documents the whole configuration.
"""

from __future__ import annotations

import argparse
import os

# The words a boolean flag or variable takes (any case), for every service and tool alike.
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off"}
# What a default gRPC channel (Python, Node, Go, ...) accepts: answers are kept within it unless raised.
DEFAULT_MAX_RESPONSE_MB = 4.0


def _parse_bool(v: str) -> bool:
    """1/true/yes/on or 0/false/no/off (any case); anything else raises ValueError (a typo such as
    ``ture`` must not silently mean false)."""
    word = str(v).strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"expected one of {', '.join(sorted(TRUE_WORDS | FALSE_WORDS))}")


class _InvalidEnv:
    """The default of a flag whose variable holds a wrong value. The usage error waits for
    ``parse_args``, so that the flag given on the command line still wins and ``--help`` still
    shows the whole help (this object stands in for the default there)."""

    def __init__(self, message: str, env: str, raw: str):
        self.message, self.env, self.raw = message, env, raw

    def __str__(self) -> str:
        return f"{self.env}={self.raw!r}, not valid"


class FlagParser(argparse.ArgumentParser):
    def __init__(self, *a, **kw):
        kw.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*a, **kw)
        self._invalid_env: dict[str, _InvalidEnv] = {}  # dest -> the variable's error

    def flag(self, name: str, *, env: str, default=None, type=str, help: str = "", repeated=False, **kw):
        """Adds ``name`` reading ``env`` when the flag is absent. ``repeated`` flags take a
        comma-separated list from the environment."""
        raw = os.environ.get(env)
        dest = kw.get("dest") or name.lstrip("-").replace("-", "_")
        if type is bool:
            value = self._from_env(dest, env, raw, _parse_bool) if raw not in (None, "") else bool(default)
            self.add_argument(
                name, default=value, action=argparse.BooleanOptionalAction, help=f"{help} [env {env}]", **kw
            )
            return
        if repeated:
            value = (
                [self._from_env(dest, env, x.strip(), type) for x in raw.split(",") if x.strip()]
                if raw
                else (default or [])
            )
            self.add_argument(name, action="append", type=type, default=None, help=f"{help} [env {env}]", **kw)
            self._repeated_defaults = getattr(self, "_repeated_defaults", {})
            self._repeated_defaults[dest] = value
            return
        value = self._from_env(dest, env, raw, type) if raw not in (None, "") else default
        choices = kw.get("choices")
        if choices is not None and not isinstance(value, _InvalidEnv) and value not in choices:
            # argparse checks only a flag's value
            value = self._invalid(dest, env, raw, f"use one of {', '.join(map(str, choices))}")
        self.add_argument(name, default=value, type=type, help=f"{help} [env {env}]", **kw)

    def _from_env(self, dest: str, env: str, raw: str, type):
        """An environment value converted like the flag's; a malformed one is a usage error (exit
        2, one line naming the variable) at ``parse_args`` unless the flag is given, as a
        malformed flag is, not a traceback."""
        try:
            return type(raw)
        except (ValueError, argparse.ArgumentTypeError) as exc:
            return self._invalid(dest, env, raw, str(exc))

    def _invalid(self, dest: str, env: str, raw: str, why: str) -> _InvalidEnv:
        bad = _InvalidEnv(f"environment variable {env}={raw!r} is not valid: {why}", env, raw)
        self._invalid_env.setdefault(dest, bad)
        return bad

    def error(self, message: str):
        """A usage error as one line (exit 2): argparse would print the whole usage first, which
        for a service is twenty lines above the one that says what to change."""
        self.exit(2, f"{self.prog}: error: {message} (--help lists every flag)\n")

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)  # --help exits here, whatever the environment holds
        for dest, value in getattr(self, "_repeated_defaults", {}).items():
            if getattr(ns, dest, None) is None:
                setattr(ns, dest, list(value))
        for dest, bad in self._invalid_env.items():
            value = getattr(ns, dest, None)
            if value is bad or (isinstance(value, list) and any(v is bad for v in value)):
                self.error(bad.message)  # the flag was not given: the variable's value counts
        return ns


def http_port(raw: str) -> int:
    """An HTTP port flag (an argparse type): -1 = off, 0 = a free port, else 1-65535."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {raw!r}") from None
    if not -1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be -1 (off), 0 (a free port) or 1-65535, got {value}")
    return value


def grpc_target(raw: str) -> str:
    """A peer service's gRPC target (an argparse type): host:port, grpc://host:port,
    grpcs://host:port or unix:/path (``extmind.channels.parse_target``); empty = none."""
    from extmind.channels import parse_target

    raw = raw.strip()
    if raw:
        try:
            parse_target(raw)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return raw


def positive_int(raw: str) -> int:
    """A whole number > 0 (an argparse type)."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {raw!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number > 0, got {value}")
    return value


def non_negative_int(raw: str) -> int:
    """A whole number >= 0 (an argparse type; 0 usually means off)."""
    try:
        value = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {raw!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 0, got {value}")
    return value


def positive_float(raw: str) -> float:
    """A number > 0 (an argparse type)."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {raw}")
    return value


def non_negative_float(raw: str) -> float:
    """A finite number >= 0 (an argparse type; 0 usually means off)."""
    try:
        value = float(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {raw!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {raw}")
    return value


def add_server_flags(p: FlagParser, *, prefix: str, port: int) -> None:
    """The flags every service shares. ``prefix`` names the service's variables (MEMORY_PORT)."""
    p.flag("--host", env=f"{prefix}_HOST", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    p.flag("--port", env=f"{prefix}_PORT", default=port, type=int, help="gRPC port (0 = pick a free one)")
    p.flag(
        "--auth-token",
        env="EXTMIND_AUTH_TOKEN",
        default="",
        help="when set, every call needs 'authorization: Bearer <token>' metadata",
    )
    p.flag("--tls-cert", env="EXTMIND_TLS_CERT", default="", help="PEM certificate chain; enables TLS with --tls-key")
    p.flag("--tls-key", env="EXTMIND_TLS_KEY", default="", help="PEM private key for --tls-cert")
    p.flag(
        "--max-message-mb",
        env="EXTMIND_MAX_MESSAGE_MB",
        default=256,
        type=int,
        help="largest gRPC message sent or received, in MiB",
    )
    p.flag(
        "--max-response-mb",
        env=f"{prefix}_MAX_RESPONSE_MB",
        default=DEFAULT_MAX_RESPONSE_MB,
        type=positive_float,
        help="largest unary response a request may ask for, in MiB; larger ones are refused up front with "
        "INVALID_ARGUMENT (stock gRPC clients receive at most 4 MiB)",
    )
    p.flag(
        "--grace-seconds",
        env="EXTMIND_GRACE_SECONDS",
        default=5.0,
        type=float,
        help="on SIGTERM/SIGINT, how long in-flight calls may finish",
    )
    p.flag(
        "--health-file",
        env="EXTMIND_HEALTH_FILE",
        default="",
        help="touch this file every 5 s while SERVING, remove it when draining (a cheap container health probe)",
    )
    p.flag("--log-level", env="EXTMIND_LOG_LEVEL", default="info", help="debug, info, warning or error")
    p.flag("--log-format", env="EXTMIND_LOG_FORMAT", default="json", help="json (one object a line) or text")
