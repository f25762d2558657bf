"""The one thread of a process that touches MLX.

MLX streams are thread-local (mlx >= 0.31.2): arrays must be evaluated on the thread that made
the stream. Engines run all MLX work here; gRPC handlers await plain results.

MLX (0.32) also wants ``mx.clear_streams()`` called on a thread before it ends: left to MLX's own
teardown, a process that ran a model on this thread aborted at exit ("terminate called without
an active exception", exit code 134) in about half the runs of a short client script. The thread
clears its streams as it ends (``_ClearStreamsOnExit``), however it ends: ``shutdown``, or the
interpreter joining it at exit when nobody called ``shutdown``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

_THREAD_STATE = threading.local()


class _ClearStreamsOnExit:
    """Lives in the MLX thread's thread-local state, so Python drops it on that thread as the
    thread ends (before the thread's C++ thread-locals go): it clears the thread's MLX streams."""

    def __init__(self):
        import mlx.core as mx  # here, not at import: a module that never starts the thread needs no MLX

        self._mx = mx

    def __del__(self):
        try:
            self._mx.clear_streams()
        except Exception:  # noqa: BLE001 - nothing to report to at thread exit; MLX tears down itself
            pass


def _on_thread_start() -> None:
    _THREAD_STATE.clear_streams = _ClearStreamsOnExit()


class MLXThread:
    def __init__(self, name: str = "mlx"):
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name, initializer=_on_thread_start
        )
        self._ident: int | None = None
        self._waiting = 0  # submitted, not started yet
        self._lock = threading.Lock()
        self._pool.submit(self._remember).result()

    def _remember(self):
        self._ident = threading.get_ident()

    def on_thread(self) -> bool:
        return threading.get_ident() == self._ident

    def submit(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        with self._lock:
            self._waiting += 1
        try:
            future = self._pool.submit(self._started, fn, args, kwargs)
        except BaseException:  # shut down: nothing was queued
            self._not_waiting()
            raise
        # Work cancelled before it started never runs ``_started`` (an asyncio caller that went
        # away cancels its queued call): it is not waiting any more either.
        future.add_done_callback(lambda f: f.cancelled() and self._not_waiting())
        return future

    def _not_waiting(self) -> None:
        with self._lock:
            self._waiting -= 1

    def _started(self, fn, args, kwargs):
        self._not_waiting()
        return fn(*args, **kwargs)

    def has_waiting(self) -> bool:
        """Whether work submitted to the thread has not started yet (a loop running on the thread
        yields to it)."""
        return self._waiting > 0

    def call(self, fn, *args, **kwargs):
        """Runs ``fn`` on the MLX thread and waits (from any non-MLX thread)."""
        if self.on_thread():
            return fn(*args, **kwargs)
        return self.submit(fn, *args, **kwargs).result()

    async def run(self, fn, *args, **kwargs):
        """Awaitable form of ``call`` for asyncio handlers."""
        return await asyncio.wrap_future(self.submit(fn, *args, **kwargs))

    def shutdown(self, wait: bool = True) -> None:
        self._pool.shutdown(wait=wait, cancel_futures=True)
