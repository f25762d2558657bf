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
