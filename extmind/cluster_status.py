"""``status`` of the local cluster: one row per part (Redis, then each service) with its process
and health, whether this run dir started it or it is external (a ``*_URL`` elsewhere, docker
compose), and the table ``make status`` prints."""

from __future__ import annotations

import re

from extmind.cluster_config import ORDER, Settings
from extmind.cluster_pids import embedded_redis_pid, read_pid, service_specs_probe
from extmind.healthcheck import check

_LOCAL_HOSTS = ("127.0.0.1", "localhost", "0.0.0.0", "::1", "[::1]", "::", "[::]")


def status_rows(s: Settings) -> list[dict]:
    """One row per part: Redis, then each service. A service whose ``*_URL`` variable points
    somewhere else than the process started from this run dir, or that answers without having
    been started from it (e.g. docker compose), is "external": its URL's gRPC health is checked.
    Redis behind an external memory service is "unknown" (not ours to see)."""
    rows = []
    for n in ORDER:
        url = _external_url(s, n)
        if url:
            rows.append(
                {
                    "service": n,
                    "port": url,
                    "pid": "-",
                    "process": "external",
                    "health": check(url, timeout=2.0),
                    "extra": f"{n.upper()}_URL",
                }
            )
            continue
        rec = read_pid(s, n)
        probe = service_specs_probe(s, n)
        health = check(probe, timeout=1.0)
        process = ("running" if rec.alive() else "dead") if rec else "not started"
        if rec is None and health != "UNREACHABLE":
            process = "external"  # something answers that this run dir did not start
        rows.append(
            {
                "service": n,
                "port": probe.rsplit(":", 1)[1],
                "pid": str(rec.pid) if rec else "-",
                "process": process,
                "health": health,
                "extra": ", ".join(f"{k} {v}" for k, v in ((rec.extra if rec else None) or {}).items()),
            }
        )
    memory = rows[ORDER.index("memory")]
    if s.redis_url:
        redis_row = {
            "service": "redis",
            "port": _redact(s.redis_url),
            "pid": "-",
            "process": "external",
            "health": _redis_url_health(s.redis_url),
            "extra": "REDIS_URL",
        }
    elif memory["process"] == "external":
        redis_row = {
            "service": "redis",
            "port": "-",
            "pid": "-",
            "process": "unknown",
            "health": "-",
            "extra": f"behind the memory service at {s.memory_url}",
        }
    else:
        pid = embedded_redis_pid(s)
        redis_row = {
            "service": "redis",
            "port": "unix",
            "pid": str(pid) if pid else "-",
            "process": "running" if pid else "not running",
            "health": _redis_health(s) if pid else "UNREACHABLE",
            "extra": f"embedded in memory, AOF in {s.memory_data_dir}",
        }
    return [redis_row] + rows


def _external_url(s: Settings, name: str) -> str:
    """The service's URL when it is not the process this run dir started, else ""."""
    url = getattr(s, f"{name}_url")
    host, _, port = url.rpartition(":")
    host = host.split("//")[-1]
    if host in _LOCAL_HOSTS:
        rec = read_pid(s, name)
        local_port = rec.port if rec else getattr(s, f"{name}_port")
        if port == str(local_port):
            return ""
    return url


def _redis_health(s: Settings) -> str:
    import redis

    sock = s.memory_data_dir / "redis.sock"
    try:
        return "PONG" if redis.Redis(unix_socket_path=str(sock), socket_timeout=1).ping() else "NO PONG"
    except (redis.RedisError, OSError, ValueError):
        return "UNREACHABLE"


def _redact(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)


def _redis_url_health(url: str) -> str:
    import redis

    try:
        c = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        return "PONG" if c.ping() else "NO PONG"
    except (redis.RedisError, OSError, ValueError):
        return "UNREACHABLE"


def status_ok(rows: list[dict]) -> bool:
    """Every service SERVING and Redis answering (or not visible from here: "-")."""
    return all(r["health"] in ("SERVING", "PONG", "-") for r in rows)


def format_table(rows: list[dict]) -> str:
    cols = ["service", "port", "pid", "process", "health", "extra"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}

    def line(r: dict) -> str:
        return "  ".join(str(r[c]).ljust(width[c]) for c in cols).rstrip()

    return "\n".join([line({c: c.upper() for c in cols})] + [line(r) for r in rows])
