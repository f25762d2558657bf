"""A service (``python -m services.X``) as a process, ready once its gRPC health check says
SERVING, and a Redis + memory service stack, as the tests and the benchmarks run them:

    with memory_stack(work_dir) as memory:        # redis-server + python -m services.memory
        stub = memory.stub()
        ...
    svc = ServiceProcess("services.embedder", ["--model", path], log_dir=tmp_path).start()
    svc.stop()                                     # stop_process(svc.proc, grace)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from extmind.procs import ROOT, RedisProcess, free_port, health_status, stop_process

# ------------------------------------------------------------------ services


class ServiceProcess:
    """``python -m <module> <args> --port <port>`` as a subprocess, ready at health SERVING; its
    output goes to ``log_path`` (one file per module and port, appended to on each start)."""

    def __init__(
        self,
        module: str,
        args: list[str] = (),
        *,
        port: int | None = None,
        env: dict | None = None,
        log_dir=None,
        health_service: str = "",
        start_timeout: float = 60.0,
        host: str = "127.0.0.1",
        root=ROOT,
    ):
        self.module = module
        self.root = Path(root)  # the checkout the module runs from (a benchmark's baseline: another one)
        self.args = list(args)
        self.port = port or free_port()
        self.host = host
        self.env = dict(os.environ, PYTHONPATH=str(self.root), PYTHONUNBUFFERED="1", **(env or {}))
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="svc-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.log_dir / f"{module.rsplit('.', 1)[-1]}-{self.port}.log"
        self.health_service = health_service
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def spawn(self) -> subprocess.Popen:
        """Starts the process without waiting for it to be ready."""
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== start #{self.starts}: {self.module} {' '.join(self.args)} --port {self.port}\n".encode())
        log.flush()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", self.module, *self.args, "--port", str(self.port)],
            cwd=str(self.root),
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        return self.proc

    def wait_ready(self, timeout: float | None = None) -> None:
        """Waits for health SERVING. Raises RuntimeError with the log's tail when the process
        exits or is not SERVING within ``timeout`` (default ``start_timeout``) seconds."""
        from grpc_health.v1 import health_pb2

        deadline = time.monotonic() + (timeout or self.start_timeout)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.module} exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if health_status(self.address, self.health_service, timeout=1.0) == health_pb2.HealthCheckResponse.SERVING:
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"{self.module} was not SERVING within {timeout or self.start_timeout:.0f}s:\n{self.log_tail()}"
        )

    def start(self) -> ServiceProcess:
        self.spawn()
        self.wait_ready()
        return self

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, like a crash."""
        if self.proc is not None:
            stop_process(self.proc, 0)

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful); SIGKILL after ``timeout`` seconds. -> exit code (None: never started)."""
        if self.proc is None:
            return None
        return stop_process(self.proc, timeout)

    def channel(self):
        """A new sync gRPC channel to the service (the caller closes it)."""
        from extmind.channels import sync_channel

        return sync_channel(self.address)


class MemoryServiceProcess(ServiceProcess):
    """``python -m services.memory --redis-url <redis_url>``; ``stub()`` -> MemoryServiceStub."""

    def __init__(self, redis_url: str, *, log_dir=None, args=(), env=None, start_timeout: float = 60.0, root=ROOT):
        super().__init__(
            "services.memory",
            ["--redis-url", redis_url, "--log-format", "text", *args],
            env=env,
            log_dir=log_dir,
            health_service="extmind.v1.MemoryService",
            start_timeout=start_timeout,
            root=root,
        )
        self._channels = []
        self.redis: RedisProcess | None = None  # set by memory_stack

    def stub(self):
        """MemoryServiceStub on a new sync channel (closed by ``close``)."""
        from extmind.v1 import memory_pb2_grpc

        ch = self.channel()
        self._channels.append(ch)
        return memory_pb2_grpc.MemoryServiceStub(ch)

    def close(self) -> None:
        for ch in self._channels:
            ch.close()
        self._channels.clear()
        self.stop()


@contextlib.contextmanager
def memory_stack(
    work_dir, *, args=(), env: dict | None = None, start_timeout: float = 60.0, root=ROOT
) -> Iterator[MemoryServiceProcess]:
    """A redis-server (``work_dir/redis``) and a memory service on it (logs in ``work_dir/logs``,
    no auth token unless ``env`` sets one), both stopped on exit. Yields the service; its Redis is
    ``.redis``. Raises RuntimeError (with the log's tail) when either does not start. ``root``:
    the checkout the memory service runs from (this one unless a benchmark compares another)."""
    work_dir = Path(work_dir)
    redis = RedisProcess(work_dir / "redis").start()
    try:
        svc = MemoryServiceProcess(
            redis.url,
            log_dir=work_dir / "logs",
            args=args,
            env={"EXTMIND_AUTH_TOKEN": "", **(env or {})},
            start_timeout=start_timeout,
            root=root,
        )
        svc.redis = redis
        try:
            yield svc.start()
        finally:
            svc.close()
    finally:
        redis.close()
