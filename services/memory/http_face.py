"""The memory service's small HTTP port (``--http-port``; -1 = off) for monitoring:

    GET /metrics   Prometheus text format (services/common/metrics.py)
    GET /health    200 {"status": "ok"} when serving; 503 {"status": "loading" | "draining"} otherwise

Served by services/common/http_server.py on the service's own event loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.common.metrics import metrics_endpoint, observe_http


def build_app(status: Callable[[], str]) -> Starlette:
    """``status()`` -> "ok", "loading" or "draining" (what /health reports)."""

    def observed(route: str, handler):
        async def endpoint(request: Request) -> Response:
            t0 = time.monotonic()
            response = await handler(request)
            observe_http("memory", route, request.method, response.status_code, time.monotonic() - t0)
            return response

        return endpoint

    async def health(request: Request) -> Response:
        state = status()
        return JSONResponse({"status": state}, status_code=200 if state == "ok" else 503)

    return Starlette(
        routes=[
            Route("/metrics", observed("/metrics", metrics_endpoint), methods=["GET"]),
            Route("/health", observed("/health", health), methods=["GET"]),
        ]
    )
