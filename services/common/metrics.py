"""Prometheus metrics (``GET /metrics`` on every service's HTTP port), via prometheus_client.

Metrics live in the process-wide default registry; each service module defines its own next to
the code that moves them (docs/architecture.md, "Metrics"). This module holds what every service
shares: the HTTP route that renders the registry in Prometheus's text format.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from starlette.requests import Request
from starlette.responses import Response


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics``: every metric of this process, Prometheus text format 0.0.4."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
