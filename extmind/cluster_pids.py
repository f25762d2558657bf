"""The processes ``up`` started: one pid file per service (``PidRecord``), stopping a service and
what is left in its process group, the redis-server the memory service started for itself, and
why a service exited while starting (read from its log)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from extmind import procs
from extmind.cluster_config import Settings, probe_host


@dataclass
class PidRecord:
    name: str
    pid: int
    start_time: str
    port: int
    argv: list[str]
    extra: dict
    # Each variable of the service's flags set in its environment -> a digest of its value
    # (cluster_config.env_digests): settings given as variables, which the command line lacks.
    # None: a pid file written before these were recorded.
    env: dict | None = None

    def alive(self) -> bool:
        st = procs.start_time(self.pid)
        return st is not None and (st == self.start_time or "?" in (st, self.start_time))


def read_pid(s: Settings, name: str) -> PidRecord | None:
    try:
        data = json.loads(s.pid_file(name).read_text())
        return PidRecord(**data)
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def write_pid(s: Settings, rec: PidRecord) -> None:
    tmp = s.pid_file(rec.name).with_suffix(".tmp")
    tmp.write_text(json.dumps(rec.__dict__))
    os.replace(tmp, s.pid_file(rec.name))


def stop_service(rec: PidRecord, grace: float, proc: subprocess.Popen | None = None) -> str:
    """SIGTERM the service, SIGKILL after ``grace`` seconds, then the same (at most 5 s grace) for
    anything left in its process group (e.g. an embedded redis-server whose parent died: it was
    started on our behalf). ``proc``: the service's ``Popen`` when this process started it, so that
    it is reaped (a zombie would count as left in the group). -> "not running", "stopped" or
    "killed after Ns grace"."""
    if not rec.alive():
        return "not running"
    code = procs.stop_process(proc if proc is not None else rec.pid, grace)
    # started with start_new_session: the service leads its own group
    procs.stop_process(rec.pid, min(grace, 5.0), group=True)
    return f"killed after {grace:.0f}s grace" if code == -signal.SIGKILL else "stopped"


def embedded_redis_pid(s: Settings) -> int | None:
    """The redis-server the memory service started for itself (pid file in its data dir), if alive."""
    if s.redis_url:
        return None
    try:
        pid = int((s.memory_data_dir / "redis.pid").read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmd = f.read()
    except (OSError, ValueError):
        return None
    return pid if b"redis" in cmd and procs.start_time(pid) is not None else None


def service_specs_probe(s: Settings, name: str) -> str:
    """host:port the health check of service ``name`` asks: the port it was started on if it was."""
    port = {"embedder": s.embedder_port, "memory": s.memory_port, "generator": s.generator_port}[name]
    rec = read_pid(s, name)
    if rec is not None:
        port = rec.port  # what was actually started, even if the environment changed since
    return f"{probe_host(name.upper())}:{port}"


# ------------------------------------------------------------------ why a service exited

_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Exit)\w*: .+|\d\d:\d\d:\d\d [EC] .+)$")
_NOISE = ("Event loop is closed", "was never awaited")


def _this_run(path: Path) -> list[str]:
    """The log lines written since the launcher's last "=== ... starting:" marker."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    starts = [i for i, x in enumerate(lines) if x.startswith("=== ") and " starting: " in x]
    return lines[starts[-1] + 1 :] if starts else lines


def exit_reason(path: Path, n: int = 8) -> str:
    """The last error line of this run that is not shutdown noise, else the log's tail."""
    lines = _this_run(path)
    if not lines:
        return "    (the log is empty)"
    errors = [x for x in lines if _ERROR_LINE.match(x.strip()) and not any(s in x for s in _NOISE)]
    if errors:  # the last one is the exception that ended the process
        return f"  reason: {errors[-1].strip()}"
    return "  last lines of the log:\n" + "\n".join("    " + x for x in lines[-n:])
