"""MLXThread: has_waiting sees work queued behind a running call; a process exits cleanly."""

import threading

from services.common.mlx_thread import MLXThread


def test_has_waiting_sees_work_queued_behind_the_running_call():
    mlx = MLXThread("test-mlx")
    try:
        release, running = threading.Event(), threading.Event()
        seen = []

        def busy():
            running.set()
            release.wait(10)
            seen.append(mlx.has_waiting())  # the call queued meanwhile has not started

        first = mlx.submit(busy)
        running.wait(10)
        assert not mlx.has_waiting()
        second = mlx.submit(lambda: mlx.has_waiting())
        assert mlx.has_waiting()
        release.set()
        first.result(10)
        assert seen == [True]
        assert second.result(10) is False  # it started: nothing is left behind it
        assert not mlx.has_waiting()
        assert mlx.call(lambda: 7) == 7 and not mlx.has_waiting()
    finally:
        mlx.shutdown()


def test_work_cancelled_before_it_started_is_not_waiting_any_more():
    """An asyncio caller that goes away while its call is still queued (a client that
    disconnects while its admit waits behind a run of steps) cancels the queued work: the count
    of waiting work must drop, else every later run of steps would stop after one step."""
    import asyncio

    mlx = MLXThread("test-mlx")
    try:
        release, running = threading.Event(), threading.Event()

        def busy():
            running.set()
            release.wait(10)

        first = mlx.submit(busy)
        running.wait(10)

        async def caller_goes_away():
            task = asyncio.ensure_future(mlx.run(lambda: 1))
            await asyncio.sleep(0.05)
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

        asyncio.run(caller_goes_away())
        plain = mlx.submit(lambda: 2)
        assert plain.cancel()  # a concurrent.futures caller may cancel queued work too
        release.set()
        first.result(10)
        assert mlx.call(lambda: 3) == 3
        assert not mlx.has_waiting()
    finally:
        mlx.shutdown()


# A client script in miniature: MLX work on an MLXThread nobody shuts down, an array of it kept
# on the main thread, then the interpreter exits. Before the thread cleared its MLX streams as it
# ended, about a third of these runs aborted at exit (rc 134, "terminate called without an
# active exception"; 2-core Linux, MLX 0.32.4 CPU), so 20 clean runs in a row would happen by
# chance with probability (2/3)^20 < 0.001.
_EXIT_SCRIPT = """
import mlx.core as mx
from services.common.mlx_thread import MLXThread
t = MLXThread("exit-check")
kept = t.call(lambda: mx.random.normal((64, 384)))
t.call(lambda: mx.softmax(kept @ mx.random.normal((384, 384)), axis=-1).sum().item())
print("done")
"""


def test_a_process_that_used_the_thread_and_never_shut_it_down_exits_cleanly():
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    for run in range(20):
        p = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT], env=env, capture_output=True, text=True, timeout=120)
        assert (p.returncode, p.stdout.strip()) == (0, "done"), f"run {run}: rc {p.returncode}, stderr {p.stderr!r}"
