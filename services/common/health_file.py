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

from extmind.errors import InvalidArgument
from services.common.background import BackgroundTask


class HealthFile:
    def __init__(self, path: str, interval: float = 5.0):
        self.path = Path(path)
        self.interval = interval
        self._task = BackgroundTask(self._beat, "health-file")

    def check(self) -> None:
        """Before the server starts: the file can be written (creating its folder). Raises
        InvalidArgument naming the flag, so a wrong path stops the start in one line instead of
        leaving a container unhealthy with no reason given."""
        try:
            self._touch()
            os.unlink(self.path)
        except OSError as exc:
            raise InvalidArgument(
                f"--health-file {self.path} cannot be written ({exc.strerror}): give a path in a writable folder"
            ) from None

    def _touch(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.touch()

    async def _beat(self) -> None:
        while True:
            await asyncio.to_thread(self._touch)
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        """Starts touching the file (call once the server is SERVING)."""
        self._task.start()

    async def stop(self) -> None:
        """Stops touching and removes the file (call when draining starts)."""
        await self._task.stop()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
