"""The memory service's small HTTP port (``--http-port``; -1 = off) for monitoring:

    GET /metrics   Prometheus text format (services/common/metrics.py)
    GET /health    200 {"status": "ok"} when serving; 503 {"status": "loading" | "draining"} otherwise

The same face as the embedder's and the generator's (services/common/http_common.py: health,
metrics, the access line and the HTTP metrics), with no API routes of its own.
"""

from __future__ import annotations

from collections.abc import Callable

from services.common.http_common import JsonFace


class MemoryHttpFace(JsonFace):
    label = "memory-http"

    def __init__(self, is_ready: Callable[[], bool]):
        super().__init__()
        self._is_ready = is_ready

    def routes(self) -> list:
        return []

    def ready(self) -> bool:
        return self._is_ready()

    def unrouted(self, method: str, path: str) -> str:
        return f"{method} {path} is not served; endpoints: GET /health, GET /metrics (the API is gRPC)"
