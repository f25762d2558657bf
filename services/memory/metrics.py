"""The memory service's Prometheus metrics (docs/architecture.md, "Metrics").

Counters move where the work ends (kv_memories.py, documents.py, kv_append.py, kv_reaper.py); the gauges are
read from the engines' in-RAM state at scrape time (``watch``), so they can never drift from it.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS

KV, DOCUMENT = "kv", "document"

SEARCHES = Counter("extmind_memory_searches", "searches answered, by kind (kv = SearchMemory, document)", ["kind"])
SEARCH_SECONDS = Histogram(
    "extmind_memory_search_seconds",
    "search duration in seconds, by kind (document: query embedding included)",
    ["kind"],
    buckets=LATENCY_BUCKETS,
)
APPENDS = Counter("extmind_memory_appends", "AppendMemory streams finished")
APPEND_ROWS = Counter("extmind_memory_append_rows", "KV rows appended, counted once per layer")
APPEND_BYTES = Counter("extmind_memory_append_bytes", "bytes of keys and values appended")
REAPED = Counter(
    "extmind_memory_reaped_memories",
    "abandoned BUILDING memories deleted (untouched for longer than MEMORY_BUILDING_TTL)",
)
ROWS = Gauge(
    "extmind_memory_rows",
    "rows searchable in RAM, by kind (kv: token rows of READY memories, one per token; document: documents)",
    ["kind"],
)
MEMORIES = Gauge("extmind_memory_memories", "READY KV memories loaded in RAM")
COLLECTIONS = Gauge("extmind_memory_collections", "document collections")


def watch(index, docs) -> None:
    """Binds the gauges to a running service's ``KVIndex`` and ``Documents`` (read at scrape time,
    on the event loop thread that also changes them)."""
    ROWS.labels(KV).set_function(lambda: sum(m.rows for m in list(index.loaded.values())))
    ROWS.labels(DOCUMENT).set_function(lambda: sum(len(c.docs) for c in docs.list()))
    MEMORIES.set_function(lambda: len(index.loaded))
    COLLECTIONS.set_function(lambda: len(docs.list()))
