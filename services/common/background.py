"""One asyncio task a service runs in the background until it stops (a health file's beat, the
memory service's reaper): started once, cancelled and awaited on stop. And ``retrieved``, for
futures whose outcome nobody may be left to await."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
from collections.abc import Awaitable, Callable


class BackgroundTask:
    def __init__(self, run: Callable[[], Awaitable[None]], name: str):
        self._run = run  # the coroutine function the task runs; it loops until cancelled
        self._name = name
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        """Started and not stopped (nor ended by itself)."""
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        """Starts the task on the running event loop (again after ``stop``; no-op while running)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self._name)

    async def stop(self) -> None:
        """Cancels the task and waits for it to end."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def retrieved(fut: asyncio.Future | concurrent.futures.Future) -> None:
    """A done callback (asyncio or concurrent.futures): marks ``fut``'s exception as seen, so that
    a future every awaiter left (a caller gone, a shared load or lookup nobody waits for any more)
    logs no "exception was never retrieved"; its awaiters, if any, still get it."""
    if not fut.cancelled():
        fut.exception()
