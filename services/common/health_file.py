"""A health file: its fresh modification time says "this server is SERVING".

Container health checks that start a Python gRPC probe every few seconds cost about a tenth of a
core at idle across three services. With ``--health-file PATH`` the server touches PATH every
``interval`` seconds from its event loop while it is SERVING and removes it when it starts to
drain, so a probe is one ``find PATH -newermt '<n> seconds ago'``: it fails when the server is
loading, draining, gone, or its event loop is stuck. docker-compose.yml uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path


class HealthFile:
    def __init__(self, path: str, interval: float = 5.0):
        self.path = Path(path)
        self.interval = interval
        self._task: asyncio.Task | None = None

    def _touch(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    async def _beat(self) -> None:
        while True:
            await asyncio.to_thread(self._touch)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        """Starts touching the file (call once the server is SERVING)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._beat())

    async def stop(self) -> None:
        """Stops touching and removes the file (call when draining starts)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
