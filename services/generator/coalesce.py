"""One memory lookup for the requests that arrive together with the same memories.

Requests with memories look them up (GetMemory, and for LOCAL the banks the device lacks) in a
worker thread before they join a batch. Each lookup's own RPC timing made requests that arrived
together join the decode batch a step or more apart: a prefill step per join and a left-padded
batch, where requests without memories, which need no lookup, all joined before the first step
(on the H200, 8 streams with a memory scaled 4.2x over one, 8 without 4.9x; bench/RESULTS.md,
12:20-12:45). So the callers of one event loop that ask for the same memories in the same loop
iteration share one lookup, started in the next iteration: they get its answer at the same moment
and are admitted back to back.

A lookup is shared only by callers that arrived before it started: whoever comes after it began
starts its own, so a request never reads memory state older than its arrival (a memory deleted
before a request arrived is not found by it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Hashable
from typing import Any

from services.common.background import retrieved


class Coalescer:
    """``run(key, fn)``: the result of ``fn()`` (run in a worker thread), shared with the callers of
    the same event loop that ask with an equal ``key`` before it starts."""

    def __init__(self):
        self._waiting: dict[tuple[int, Hashable], asyncio.Future] = {}
        self._lock = threading.Lock()  # callers may run on several event loops (threads)
        self._tasks: set[asyncio.Task] = set()  # started lookups, referenced until they end

    def pending(self, key: Hashable) -> bool:
        """Whether ``run(key, ...)``, called now on the running event loop, would share a lookup
        that another caller asked for (it has not started yet)."""
        with self._lock:
            return (id(asyncio.get_running_loop()), key) in self._waiting

    async def run(self, key: Hashable, fn: Callable[[], Any]) -> Any:
        """Raises whatever ``fn`` raised (each sharing caller gets the same exception). A caller
        cancelled while it waits leaves the lookup running for the others."""
        loop = asyncio.get_running_loop()
        k = (id(loop), key)
        with self._lock:
            fut = self._waiting.get(k)
            if fut is None:
                fut = loop.create_future()
                fut.add_done_callback(retrieved)  # every caller may have gone: no "never retrieved" log
                self._waiting[k] = fut
                loop.call_soon(self._start, k, fut, fn)
        return await asyncio.shield(fut)

    def _start(self, k: tuple[int, Hashable], fut: asyncio.Future, fn: Callable[[], Any]) -> None:
        with self._lock:
            del self._waiting[k]  # from now on a caller starts its own lookup
        task = asyncio.ensure_future(asyncio.to_thread(fn))
        self._tasks.add(task)

        def done(t: asyncio.Task) -> None:
            self._tasks.discard(t)
            if fut.done():
                return
            if t.cancelled():
                fut.cancel()
            elif t.exception() is not None:
                fut.set_exception(t.exception())
            else:
                fut.set_result(t.result())

        task.add_done_callback(done)
