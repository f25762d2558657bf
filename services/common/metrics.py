"""Prometheus metrics (``GET /metrics`` on every service's HTTP port), via prometheus_client.

Metrics live in the process-wide default registry; each service module defines its own next to
the code that moves them (docs/architecture.md, "Metrics" lists them all). This module holds what
every service shares: the HTTP route that renders the registry in Prometheus's text format, the
gRPC call metrics the shared interceptor moves, and ``observe_http`` for the HTTP faces' routes.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, generate_latest
from starlette.requests import Request
from starlette.responses import Response

# Latency buckets (seconds) shared by the request histograms: 1 ms .. 2 min.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

GRPC_REQUESTS = Counter(
    "extmind_grpc_requests",
    "gRPC calls ended, by service, method and status code",
    ["service", "method", "code"],
)
GRPC_SECONDS = Histogram(
    "extmind_grpc_request_seconds",
    "gRPC call duration in seconds (streams: until the last message), by service and method",
    ["service", "method"],
    buckets=LATENCY_BUCKETS,
)
GRPC_IN_FLIGHT = Gauge("extmind_grpc_in_flight", "gRPC calls running now, by service and method", ["service", "method"])

HTTP_REQUESTS = Counter(
    "extmind_http_requests",
    "HTTP requests answered, by face, route, method and status",
    ["face", "route", "method", "status"],
)
HTTP_SECONDS = Histogram(
    "extmind_http_request_seconds",
    "HTTP request duration in seconds (streams: until the last byte), by face and route",
    ["face", "route"],
    buckets=LATENCY_BUCKETS,
)


def split_method(full: str) -> tuple[str, str]:
    """``/extmind.v1.MemoryService/SearchMemory`` -> (``extmind.v1.MemoryService``, ``SearchMemory``)."""
    service, _, method = full.lstrip("/").rpartition("/")
    return service, method


def observe_grpc(full_method: str, code_name: str, seconds: float) -> None:
    """One ended gRPC call (the shared interceptor calls this where it writes the access line)."""
    service, method = split_method(full_method)
    GRPC_REQUESTS.labels(service, method, code_name).inc()
    GRPC_SECONDS.labels(service, method).observe(seconds)


def observe_http(face: str, route: str, method: str, status: int, seconds: float) -> None:
    """One answered HTTP request, for the HTTP faces to call once per request.

    face: which HTTP face (``embedder``, ``generator``, ``memory``); route: the route *template*
    (``/v1/embeddings``, never a raw path with ids in it, which would make a label per id);
    method: ``GET``/``POST``...; status: the HTTP status sent; seconds: from the request's arrival
    to its last byte. Moves ``extmind_http_requests_total`` and ``extmind_http_request_seconds``."""
    HTTP_REQUESTS.labels(face, route, method, str(status)).inc()
    HTTP_SECONDS.labels(face, route).observe(seconds)


async def metrics_endpoint(request: Request) -> Response:
    """``GET /metrics``: every metric of this process, Prometheus text format 0.0.4."""
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
