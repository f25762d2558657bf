"""Deletes abandoned BUILDING memories: a memory whose builder died (a generator SIGKILLed
mid-Memorize, a memory service restarted under an open stream) stays BUILDING with no one to
finish or delete it. The rule (docs/contract.md, "KV memories"):

- a BUILDING memory is abandoned when neither CreateMemory nor an AppendMemory stream has touched
  it for longer than ``ttl`` seconds (MEMORY_BUILDING_TTL). The last touch is ``touch_us`` in its
  meta hash, by Redis's clock, so a restarted service (or another replica) judges it alike;
- a memory an append stream of this service holds open is never deleted, however idle; each sweep
  also touches those, so other services on the same Redis see them alive;
- READY memories are never touched.

Every ``interval`` seconds (a quarter of the TTL, at most a minute) one sweep lists the idle
BUILDING memories and deletes each through ``KVMemories.reap``: DeleteMemory's path, with the
idleness re-checked in the same Redis script that deletes, so an append that lands first keeps
the memory and one that comes after finds it gone (NOT_FOUND) and stores nothing.
"""

from __future__ import annotations

import asyncio
import logging

from services.common.background import BackgroundTask
from services.memory import metrics
from services.memory.kv_memories import KVMemories

log = logging.getLogger("extmind.memory")

MAX_INTERVAL_SECONDS = 60.0
MIN_INTERVAL_SECONDS = 0.05


class BuildingReaper:
    """The sweep of one memory service. ``ttl`` seconds > 0; ``interval`` seconds between sweeps
    (default ttl / 4, within 0.05-60). ``task.start()`` runs it as an asyncio task, ``task.stop()`` ends it;
    ``sweep()`` is one pass (tests call it directly)."""

    def __init__(self, kv: KVMemories, ttl: float, interval: float | None = None):
        if ttl <= 0:
            raise ValueError(f"ttl is {ttl}; it must be > 0 (0 = no reaper: do not make one)")
        self.kv = kv
        self.ttl = ttl
        self.interval = interval or min(max(ttl / 4, MIN_INTERVAL_SECONDS), MAX_INTERVAL_SECONDS)
        self.task = BackgroundTask(self._run, "building-reaper")  # start() / stop() run the sweeps

    async def sweep(self) -> list[str]:
        """One pass. -> the ids deleted. Raises Unavailable when Redis is unreachable."""
        for memory_id in self.kv.writing():
            await self.kv.store.touch(memory_id)
        ttl_us = int(self.ttl * 1_000_000)
        reaped = []
        for memory_id, idle_us, size in await self.kv.store.idle_building(ttl_us):
            if not await self.kv.reap(memory_id, ttl_us):
                continue  # written, finished or deleted since it was listed
            reaped.append(memory_id)
            metrics.REAPED.inc()
            log.warning(
                "abandoned BUILDING memory deleted",
                extra={
                    "memory_id": memory_id,
                    "idle_seconds": round(idle_us / 1e6, 3),
                    "ttl_seconds": self.ttl,
                    "bytes": size,
                },
            )
        return reaped

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep()
            except Exception as e:  # noqa: BLE001 - Redis down: try again next interval
                log.warning("sweep for abandoned memories failed", extra={"error": repr(e)})
