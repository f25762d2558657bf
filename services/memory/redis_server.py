"""Redis for the memory service: the embedded default, and durability checks on an external one.

Without ``--redis-url`` the service starts a real ``redis-server`` on a unix socket under
``--data-dir`` with ``appendonly yes`` and ``appendfsync always`` and no TCP port, and stops it on
exit. With appendfsync always Redis fsyncs the AOF before it replies, so every acknowledged write
is durable.

The embedded Redis belongs to the data directory, not to ``PATH``: the directory records which
binary and version wrote it (``redis-owner.json``), later starts use that binary, and an older
Redis is never started on data a newer one wrote (Redis 7's multi-part AOF is unreadable to 6.2,
which would start empty beside it). The binary is chosen in one documented order that does not
depend on an activated virtual env: see :func:`extmind.procs.find_redis_server` and docs/platform.md.

With an external Redis, ``ensure_durable`` checks AOF + ``appendfsync always`` and turns them on
with CONFIG SET when they are off; when CONFIG is not allowed it refuses to start (unless
volatile Redis is allowed). WAITAOF is not needed with ``appendfsync always`` (and Redis 7.0, the
Debian one, has none).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time

import redis

from extmind.errors import FailedPrecondition
from extmind.procs import find_redis_server, redis_server_args, server_version, stop_process

log = logging.getLogger("extmind.memory.redis")

# Records which redis-server owns a data directory (see check_owner).
OWNER_FILE = "redis-owner.json"

# Unix socket paths are limited to 107 bytes on Linux.
_MAX_SOCKET_PATH = 100


def _dotted(version) -> str:
    return ".".join(map(str, version))


def read_owner(data_dir: str) -> dict | None:
    """The record of the Redis that owns ``data_dir``: {"binary", "version": [major, minor, patch]}."""
    try:
        with open(os.path.join(data_dir, OWNER_FILE)) as f:
            owner = json.load(f)
        return {"binary": str(owner["binary"]), "version": tuple(int(x) for x in owner["version"])}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FailedPrecondition(
            f"{os.path.join(data_dir, OWNER_FILE)} is unreadable ({exc}): it records which "
            "redis-server owns this data directory; restore it or remove it to adopt the data"
        ) from None


def _write_owner(data_dir: str, binary: str, version) -> None:
    path = os.path.join(data_dir, OWNER_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({"binary": binary, "version": list(version)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def check_owner(data_dir: str, binary: str, version) -> None:
    """Refuses, with one line that says what to do, to start ``binary`` (``version``) on a data
    directory that an incompatible Redis wrote (FailedPrecondition): one newer than it (recorded), or, for directories
    from before the record existed, a multi-part AOF (Redis >= 7) that a Redis < 7 cannot read."""
    owner = read_owner(data_dir)
    if owner is not None and tuple(version) < owner["version"]:
        raise FailedPrecondition(
            f"the data in {data_dir} was written by redis-server {_dotted(owner['version'])} ({owner['binary']}); "
            f"the redis-server found is {_dotted(version)} ({binary}), which cannot read it: install redis-server "
            f">= {_dotted(owner['version'])} or point --redis-server (MEMORY_REDIS_SERVER) at it"
        )
    if owner is None and tuple(version) < (7,) and os.path.isdir(os.path.join(data_dir, "appendonlydir")):
        raise FailedPrecondition(
            f"the data in {data_dir} is a Redis >= 7 multi-part AOF; the redis-server found is {_dotted(version)} "
            f"({binary}), which cannot read it: install redis-server >= 7 or point --redis-server "
            "(MEMORY_REDIS_SERVER) at it"
        )


def _die_with_parent_prefix() -> list[str]:
    """Linux: run redis-server under ``setpriv --pdeathsig TERM`` so it is stopped when the service
    dies, even by SIGKILL. (A ``preexec_fn`` doing the prctl runs Python in a forked child of a
    threaded process and can abort it; setpriv sets it between fork and exec without Python.)"""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


class EmbeddedRedis:
    """A redis-server owned by this process: unix socket, AOF fsync'ed on every write."""

    def __init__(self, data_dir: str, binary: str = ""):
        self.data_dir = os.path.abspath(data_dir)
        owner = read_owner(self.data_dir)
        self.binary = find_redis_server(binary, owner["binary"] if owner else "")
        self.version = server_version(self.binary)
        self.proc: subprocess.Popen | None = None
        self._socket_dir: str | None = None
        self.socket = ""

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def _pick_socket(self) -> str:
        path = os.path.join(self.data_dir, "redis.sock")
        if len(path) <= _MAX_SOCKET_PATH:
            return path
        self._socket_dir = tempfile.mkdtemp(prefix="extmind-redis-")
        return os.path.join(self._socket_dir, "redis.sock")

    def _stop_stale(self, pidfile: str) -> None:
        """A previous service killed with SIGKILL may have left its redis-server running on our
        data directory (on non-Linux systems); stop it before starting a new one."""
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"redis" not in f.read():
                    return
        except OSError:
            if sys.platform.startswith("linux"):
                return
        if stop_process(pid, 10.0) is not None:
            log.warning("stopped a stale redis-server left on this data directory", extra={"pid": pid})

    def start(self, timeout: float = 30.0) -> str:
        os.makedirs(self.data_dir, exist_ok=True)
        check_owner(self.data_dir, self.binary, self.version)
        self.socket = self._pick_socket()
        pidfile = os.path.join(self.data_dir, "redis.pid")
        self._stop_stale(pidfile)
        if os.path.exists(self.socket):
            os.unlink(self.socket)
        args = redis_server_args(
            self.binary,
            self.socket,
            self.data_dir,
            extra=["--bind", "127.0.0.1", "--pidfile", pidfile, "--protected-mode", "yes"],
        )
        log.info(
            "starting embedded redis-server",
            extra={
                "binary": self.binary,
                "version": ".".join(map(str, self.version)),
                "data_dir": self.data_dir,
                "socket": self.socket,
            },
        )
        # Own session: a Ctrl-C on the terminal reaches the service, which then stops Redis in order.
        self.proc = subprocess.Popen(
            _die_with_parent_prefix() + args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        client = redis.Redis(unix_socket_path=self.socket, socket_timeout=2)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"redis-server exited with code {self.proc.returncode}; see "
                        f"{os.path.join(self.data_dir, 'redis.log')}"
                    )
                try:
                    if client.ping():
                        # Loading a large AOF answers LOADING errors until it is done. From now
                        # on the data is in this version's format: record who owns it.
                        _write_owner(self.data_dir, self.binary, self.version)
                        return self.url
                except (redis.ConnectionError, redis.BusyLoadingError, FileNotFoundError, redis.TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"redis-server did not answer within {timeout:.0f}s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None:
            return
        stop_process(self.proc, timeout)  # on SIGTERM redis flushes the AOF and exits
        log.info("embedded redis-server stopped", extra={"code": self.proc.returncode})
        self.proc = None
        if self._socket_dir:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None


def _wait_aof_on(client: redis.Redis, timeout: float = 120.0) -> None:
    """Turning AOF on starts a rewrite; writes are fsynced to the AOF only after it finishes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.info("persistence")
        if (
            info.get("aof_enabled") == 1
            and not info.get("aof_rewrite_in_progress")
            and not info.get("aof_rewrite_scheduled")
        ):
            return
        time.sleep(0.05)
    raise RuntimeError("Redis did not finish turning AOF on within two minutes")


def ensure_durable(url: str, *, allow_volatile: bool = False) -> str:
    """Makes sure an acknowledged write survives a crash of Redis. Returns the mode:
    ``appendfsync-always``, or ``volatile`` (only with ``allow_volatile``)."""
    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        version = tuple(int(x) for x in str(client.info("server").get("redis_version", "0.0.0")).split(".")[:3])
        try:
            policy = client.config_get("maxmemory-policy").get("maxmemory-policy", "noeviction")
        except redis.ResponseError:
            policy = "unknown"
        if policy not in ("noeviction", "unknown"):
            log.warning(
                "redis evicts keys when full (maxmemory-policy %s): memories can silently lose rows; "
                "use maxmemory-policy noeviction",
                policy,
            )
        try:
            conf = client.config_get("append*")
        except redis.ResponseError:
            conf = None
        if conf is not None and conf.get("appendonly") == "yes" and conf.get("appendfsync") == "always":
            log.info("redis durability: AOF with appendfsync always already on", extra={"redis_version": version})
            return "appendfsync-always"
        if conf is not None:
            try:
                client.config_set("appendonly", "yes")
                client.config_set("appendfsync", "always")
                _wait_aof_on(client)
                log.warning(
                    "redis durability: turned on appendonly yes + appendfsync always with CONFIG SET "
                    "(put them in redis.conf to keep them after a Redis restart)",
                    extra={"redis_version": version, "was": conf},
                )
                return "appendfsync-always"
            except redis.ResponseError as e:
                log.warning("redis durability: CONFIG SET refused", extra={"error": str(e)})
        message = (
            "cannot make acknowledged writes durable on this Redis: set 'appendonly yes' and "
            "'appendfsync always' in its configuration (CONFIG is not allowed here)"
        )
        if not allow_volatile:
            raise RuntimeError(message + "; or start with --allow-volatile-redis to accept losing recent writes")
        log.warning("redis durability: NONE; " + message)
        return "volatile"
    finally:
        client.close()
