"""Shared fixtures (the processes behind them: ``extmind/procs.py``; other helpers:
``tests/helpers.py``).

``redis_server``    a real redis-server (AOF, appendfsync always) on a unix socket in tmp_path:
                    ``.url``, ``.client()``, ``.stop()``, ``.kill()``, ``.start()`` (same data).
``memory_service``  ``python -m services.memory --redis-url <redis_server.url>`` as a subprocess,
                    ready at health SERVING: ``.address``, ``.kill()`` (SIGKILL), ``.stop()``
                    (SIGTERM), ``.start()`` (restart on the same Redis and port), ``.stub()``
                    -> MemoryServiceStub on a sync channel.
``memory_service_factory``  makes more of them: ``factory(env={...}, args=[...])``.
``module_memory_service``   a Redis + memory service of its own for each test module that asks
                    for it, started once for the module (``.redis`` is its RedisProcess).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# The tests compare float32 results tightly against numpy and PyTorch. On MLX's CUDA backend
# float32 matmuls use TF32 by default (~1e-3 relative error): ask for full float32, in this
# process and in every service process the tests start (they inherit the environment).
os.environ.setdefault("MLX_ENABLE_TF32", "0")

from extmind.procs import RedisProcess  # noqa: E402
from extmind.service_procs import MemoryServiceProcess, memory_stack  # noqa: E402
from services.common.blas import scrub_preload  # noqa: E402

# `make test` preloads OpenBLAS for the MLX work done inside pytest; the processes the tests start
# must not inherit it (redis-server and node do not want it; MLX services re-exec with it).
scrub_preload()

_REDIS_FIXTURES = ("redis_server", "module_memory_service")


@pytest.fixture
def redis_server(tmp_path):
    r = RedisProcess(tmp_path / "redis").start()
    yield r
    r.close()


@pytest.fixture
def memory_service_factory(redis_server, tmp_path):
    made = []

    def make(*, redis_url: str | None = None, args=(), env=None, start=True) -> MemoryServiceProcess:
        svc = MemoryServiceProcess(
            redis_url or redis_server.url,
            log_dir=tmp_path / "logs",
            args=args,
            env={"EXTMIND_AUTH_TOKEN": "", **(env or {})},
        )
        made.append(svc)
        if start:
            svc.start()
        return svc

    yield make
    for svc in made:
        svc.close()


@pytest.fixture
def memory_service(memory_service_factory):
    return memory_service_factory()


@pytest.fixture(scope="module")
def module_memory_service(tmp_path_factory, request):
    with memory_stack(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])) as svc:
        yield svc


def pytest_collection_modifyitems(config, items):
    # Tests that need a redis-server binary skip cleanly where there is none at all.
    if os.environ.get("EXTMIND_SKIP_REDIS_TESTS") == "1":
        skip = pytest.mark.skip(reason="EXTMIND_SKIP_REDIS_TESTS=1")
        for item in items:
            if any(f in getattr(item, "fixturenames", ()) for f in _REDIS_FIXTURES):
                item.add_marker(skip)
