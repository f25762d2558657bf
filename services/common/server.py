"""grpc.aio server bootstrap shared by every service, and the one ``python -m services.X`` entry.

Lifecycle: bind the port -> health NOT_SERVING, every other RPC UNAVAILABLE "<service> is
loading" -> ``on_start()`` (load models, rebuild indexes) -> SERVING -> ... SIGTERM/SIGINT ->
NOT_SERVING -> in-flight calls get ``--grace-seconds`` -> ``on_stop()``. Health is reported for
"" and for every service name; reflection lists them all. docs/architecture.md has the picture.

Every service's ``app.py`` has the same shape: ``parse_args(argv)`` and an App class (see
:class:`App`); its ``__main__.py`` calls :func:`main` with them.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from extmind.channels import OPTIONS
from extmind.errors import ExtmindError
from services.common.health_file import HealthFile
from services.common.interceptor import AuthInterceptor, ErrorInterceptor, ReadinessInterceptor

log = logging.getLogger("extmind.server")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Service:
    name: str  # full proto name, e.g. "extmind.v1.MemoryService"
    register: Callable[[grpc.aio.Server], None]  # e.g. lambda s: add_XServicer_to_server(impl, s)


def _server_options(args) -> list:
    limit = int(args.max_message_mb) * 1024 * 1024
    return [o for o in OPTIONS if "message_length" not in o[0]] + [
        ("grpc.max_send_message_length", limit),
        ("grpc.max_receive_message_length", limit),
        ("grpc.so_reuseport", 0),
        # Clients keep idle channels alive with pings (extmind.channels); without these the server
        # answers them with GOAWAY "too many pings" and the next call on the channel fails.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 0),
    ]


class App(Protocol):
    """What every service's App class offers (``App(args)`` builds it, nothing starts yet)."""

    label: str  # how messages name it, e.g. "the memory service"
    loading: str  # what on_start does, e.g. "rebuilding its indexes from Redis"
    services: list[Service]

    async def on_start(self) -> None: ...  # runs after the port is bound; RPCs wait for it

    async def on_stop(self) -> None: ...  # runs after the drain

    def on_drain(self) -> None: ...  # optional: runs when the drain starts (HTTP /health turns 503)

    def describe(self) -> dict: ...  # the fields of the "starting" log line


class Server:
    def __init__(
        self,
        args,
        services: list[Service],
        *,
        on_start: Callable[[], Awaitable[None]] | None = None,
        on_stop: Callable[[], Awaitable[None]] | None = None,
        on_drain: Callable[[], None] | None = None,
        label: str = "",
        loading: str = "starting up",
    ):
        self.args = args
        self.services = services
        self.on_start = on_start
        self.on_stop = on_stop
        self.on_drain = on_drain
        self.readiness = ReadinessInterceptor(label or " and ".join(s.name for s in services) or "the service", loading)
        self.health = health.aio.HealthServicer()
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._stopped = asyncio.Event()
        self.health_file = HealthFile(args.health_file) if getattr(args, "health_file", "") else None

    @classmethod
    def of(cls, args, app: App) -> Server:
        return cls(
            args,
            app.services,
            on_start=app.on_start,
            on_stop=app.on_stop,
            on_drain=getattr(app, "on_drain", None),
            label=app.label,
            loading=app.loading,
        )

    async def _set_health(self, status) -> None:
        for name in ["", *(s.name for s in self.services)]:
            await self.health.set(name, status)

    async def start(self) -> int:
        if self.health_file is not None:
            self.health_file.check()
        interceptors = [self.readiness, ErrorInterceptor()]
        if self.args.auth_token:
            interceptors.insert(0, AuthInterceptor(self.args.auth_token))
        server = grpc.aio.server(interceptors=interceptors, options=_server_options(self.args))
        for s in self.services:
            s.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [s.name for s in self.services]
            + [health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
        )
        address = f"{self.args.host}:{self.args.port}"
        if self.args.tls_cert:
            with open(self.args.tls_cert, "rb") as f:
                chain = f.read()
            with open(self.args.tls_key, "rb") as f:
                key = f.read()
            self.port = server.add_secure_port(address, grpc.ssl_server_credentials([(key, chain)]))
        else:
            self.port = server.add_insecure_port(address)
        if not self.port:
            raise RuntimeError(f"could not listen on {address}")
        await self._set_health(NOT_SERVING)
        await server.start()
        self._server = server
        log.info(
            "listening; loading",
            extra={
                "address": f"{self.args.host}:{self.port}",
                "tls": bool(self.args.tls_cert),
                "auth": bool(self.args.auth_token),
            },
        )
        if self.on_start is not None:
            await self.on_start()
        self.readiness.ready = True
        await self._set_health(SERVING)
        if self.health_file is not None:
            self.health_file.start()
        log.info("serving", extra={"port": self.port, "services": [s.name for s in self.services]})
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        if self._server is None or self._stopped.is_set():
            return
        self._stopped.set()
        grace = self.args.grace_seconds if grace is None else grace
        log.info("draining", extra={"grace_seconds": grace})
        if self.on_drain is not None:
            self.on_drain()
        if self.health_file is not None:
            await self.health_file.stop()
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        if self.on_stop is not None:
            await self.on_stop()
        log.info("stopped")

    async def wait(self) -> None:
        await self._stopped.wait()


async def _serve_until_signal(server: Server) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    starting = asyncio.create_task(server.start())
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({starting, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if starting in done and starting.exception() is not None:
        waiter.cancel()
        await server.stop(0)
        raise starting.exception()
    if starting in done:
        await waiter
    else:
        starting.cancel()
    await server.stop()


def main(app_cls: Callable[[object], App], parse_args: Callable, argv=None) -> None:
    """``python -m services.X``: flags, logging, the app, then serve until SIGTERM/SIGINT (blocking)."""
    from services.common.logs import setup_logging

    args = parse_args(argv)
    setup_logging(args.log_level, args.log_format)
    app = app_cls(args)
    log.info("starting", extra={"port": args.port, **app.describe()})
    server = Server.of(args, app)
    try:
        asyncio.run(_serve_until_signal(server))
    except ExtmindError as exc:  # a start-up error with a human message: no traceback needed
        log.error("service failed to start: %s", exc.message)
        raise SystemExit(1) from None
    except Exception as exc:
        log.exception("service failed")
        raise SystemExit(1) from exc
