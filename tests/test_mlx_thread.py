"""MLXThread.has_waiting: a loop running on the MLX thread sees work submitted behind it."""

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
