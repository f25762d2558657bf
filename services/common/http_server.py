"""The HTTP side of a service: a Starlette app served by uvicorn on the service's own event loop.

Every service that has an HTTP port (``--http-port``; -1 = off) builds a Starlette app of its
routes and starts it with :func:`start_http` after its gRPC port is bound, so both faces share one
process, one event loop and one engine. uvicorn runs with ``lifespan="off"`` (the service's own
lifecycle in services/common/server.py decides when it is ready) and logs through the service's
logger config (docs/architecture.md, "HTTP faces").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import anyio
import uvicorn

log = logging.getLogger("extmind.http")


class HttpServer:
    """One running uvicorn server. ``port`` is the bound port (useful with port 0)."""

    def __init__(self, server: uvicorn.Server, sock: socket.socket, task: asyncio.Task):
        self._server = server
        self._sock = sock
        self._task = task
        self.port: int = sock.getsockname()[1]

    async def stop(self, grace: float = 5.0) -> None:
        """Stops accepting, gives open requests ``grace`` seconds (s), then closes them."""
        self._server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except (TimeoutError, asyncio.TimeoutError):
            self._server.force_exit = True
            await self._task
        finally:
            self._sock.close()


async def start_http(
    app, host: str, port: int, *, label: str = "http", limit_concurrency: int | None = None
) -> HttpServer:
    """Binds ``host:port`` (0 = any free port) and serves ``app`` (any ASGI app) in a task of the
    running loop. Raises OSError when the port cannot be bound (before anything is served)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not 0: asyncio turns Nagle off (TCP_NODELAY) only on accepted sockets
    # whose proto says TCP (base_events._set_nodelay). With Nagle on, a stream's events after the
    # response headers waited for the client's delayed ACK (~40 ms on Linux) on every keep-alive
    # connection's second and later requests: the first token came with the last.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(512)
    sock.setblocking(False)
    config = uvicorn.Config(
        app,
        lifespan="off",
        log_config=None,
        access_log=False,  # the routes log one access line each, like the gRPC interceptor
        timeout_keep_alive=30,
        limit_concurrency=limit_concurrency,
        h11_max_incomplete_event_size=64 * 1024,
        server_header=False,
    )
    server = uvicorn.Server(config)
    # The service owns SIGTERM/SIGINT (services/common/server.py drains, then stops this server);
    # uvicorn would otherwise take them over and close the port at once, mid-drain.
    server.capture_signals = contextlib.nullcontext
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"{label}-server")
    while not server.started:
        if task.done():
            task.result()  # raises the start-up error
            raise OSError(f"{label}: HTTP server stopped while starting")
        await asyncio.sleep(0.01)
    # A streamed answer (Starlette's StreamingResponse) runs in an anyio task group, and anyio
    # imports its asyncio backend on first use: ~16-25 ms on a 2-core CPU that the first streamed
    # request after start paid before its first event. Paid here, before the service is SERVING.
    async with anyio.create_task_group():
        pass
    hs = HttpServer(server, sock, task)
    log.info("http listening", extra={"address": f"{host}:{hs.port}", "face": label})
    return hs
