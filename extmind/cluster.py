"""The local cluster launcher: ``python -m extmind.cluster up|down|status|exec [--run-dir DIR]``.

``up`` starts the embedder, memory (which runs its own Redis unless REDIS_URL is set) and generator
services as background processes, each with a log and a pid file under one run directory
(default ``.run/``), and waits until every gRPC health check says SERVING. ``down`` stops exactly
the processes named by the pid files (SIGTERM, then SIGKILL after a grace). ``status`` prints a
table. ``exec NAME`` runs one service in the foreground with the same command line (containers).

Configuration (environment variables, defaults in brackets) is listed in ``ENV_VARS`` below and by
``python -m extmind.cluster --help``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from extmind.healthcheck import check

REPO = Path(__file__).resolve().parent.parent

# name -> (default, meaning). The README's configuration table is generated from the same facts.
ENV_VARS = {
    "EMBEDDER_PORT": ("50051", "embedder gRPC port"),
    "EMBEDDER_HTTP_PORT": ("8000", "embedder HTTP face (/embed, /v1/embeddings, /health)"),
    "MEMORY_PORT": ("50052", "memory gRPC port"),
    "GENERATOR_PORT": ("50053", "generator gRPC port"),
    "EMBEDDER_MODEL": ("", "embedder model aliases or paths, comma-separated (empty = offline all-MiniLM-L6-v2)"),
    "EMBEDDER_RERANKER": ("", "reranker model alias or path (empty = no reranker)"),
    "GENERATOR_MODEL": ("", "generator model path or hub id (empty = the committed models/extmind-facts-6m)"),
    "REDIS_URL": ("", "Redis for the memory service (empty = memory starts its own with AOF)"),
    "MEMORY_DATA_DIR": ("<run dir>/data/memory", "memory service data dir (its embedded Redis' AOF)"),
    "EXTMIND_MODEL_CACHE": ("<run dir>/models", "where the launcher builds the default generator model"),
    "EMBEDDER_URL": ("127.0.0.1:$EMBEDDER_PORT", "where clients and the memory service reach the embedder"),
    "MEMORY_URL": ("127.0.0.1:$MEMORY_PORT", "where clients and the generator reach the memory service"),
    "GENERATOR_URL": ("127.0.0.1:$GENERATOR_PORT", "where clients reach the generator"),
    "EXTMIND_START_TIMEOUT": ("600", "seconds `up` waits for every service to say SERVING"),
    "EXTMIND_STOP_GRACE": ("15", "seconds `down` waits after SIGTERM before SIGKILL"),
    "EXTMIND_RUN_DIR": (".run", "run directory (logs/, pids/, data/, models/)"),
}

ORDER = ("embedder", "memory", "generator")  # start order; stopped in reverse
# The offline default: a 5.8M-parameter Llama trained (training/train.py) to answer questions about
# fictional people from facts in its prompt or its extended mind; see its README.md.
FACTS_MODEL = REPO / "models" / "extmind-facts-6m"
FACTS_MODEL_NOTICE = (
    "NOTE: GENERATOR_MODEL is not set, so the generator serves models/extmind-facts-6m, a tiny Llama\n"
    "      trained only to answer 'Question: ...?\\nAnswer:' about facts of fictional people that it\n"
    "      has in its prompt or in its memory; other prompts give meaningless text. Set GENERATOR_MODEL\n"
    "      to a model directory or hub id for general text.")
RANDOM_MODEL_NOTICE = (
    "NOTE: GENERATOR_MODEL is not set, so the generator serves a tiny RANDOM-WEIGHT Llama built locally.\n"
    "      Its text is meaningless; memorize, retrieval and citations still run for real.\n"
    "      Set GENERATOR_MODEL to a model directory or hub id for real text.")


class LaunchError(RuntimeError):
    """A readable, one-paragraph reason why the cluster could not start."""


def _env(name: str) -> str:
    return os.environ.get(name, "").strip()


def _port(name: str) -> int:
    raw = _env(name) or ENV_VARS[name][0]
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"{name}={raw!r} is not a port number") from None


def _probe_host(prefix: str) -> str:
    host = _env(f"{prefix}_HOST")
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host


@dataclass
class ServiceSpec:
    name: str
    argv: list[str]
    port: int
    probe: str                      # host:port the health check asks
    extra: dict = field(default_factory=dict)  # shown in status (e.g. the HTTP port)


@dataclass
class Settings:
    run_dir: Path
    embedder_port: int
    embedder_http_port: int
    memory_port: int
    generator_port: int
    embedder_model: str
    embedder_reranker: str
    generator_model: str
    redis_url: str
    memory_data_dir: Path
    model_cache: Path
    embedder_url: str
    memory_url: str
    generator_url: str
    start_timeout: float
    stop_grace: float

    @classmethod
    def from_env(cls, run_dir: str | os.PathLike | None = None) -> "Settings":
        run = Path(run_dir or _env("EXTMIND_RUN_DIR") or ".run").resolve()
        ep, hp, mp, gp = (_port(n) for n in ("EMBEDDER_PORT", "EMBEDDER_HTTP_PORT", "MEMORY_PORT", "GENERATOR_PORT"))
        return cls(
            run_dir=run, embedder_port=ep, embedder_http_port=hp, memory_port=mp, generator_port=gp,
            embedder_model=_env("EMBEDDER_MODEL"), embedder_reranker=_env("EMBEDDER_RERANKER"),
            generator_model=_env("GENERATOR_MODEL"),
            redis_url=_env("REDIS_URL"),
            memory_data_dir=Path(_env("MEMORY_DATA_DIR") or run / "data" / "memory"),
            model_cache=Path(_env("EXTMIND_MODEL_CACHE") or run / "models"),
            embedder_url=_env("EMBEDDER_URL") or f"127.0.0.1:{ep}",
            memory_url=_env("MEMORY_URL") or f"127.0.0.1:{mp}",
            generator_url=_env("GENERATOR_URL") or f"127.0.0.1:{gp}",
            start_timeout=float(_env("EXTMIND_START_TIMEOUT") or 600),
            stop_grace=float(_env("EXTMIND_STOP_GRACE") or 15),
        )

    @property
    def logs(self) -> Path:
        return self.run_dir / "logs"

    @property
    def pids(self) -> Path:
        return self.run_dir / "pids"

    def log_file(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def pid_file(self, name: str) -> Path:
        return self.pids / f"{name}.pid"


# ------------------------------------------------------------------ the generator's default model

def default_generator_model(cache: Path, announce=print) -> Path:
    """A small random-weight Llama (HF layout + tokenizer), built once and cached under ``cache``."""
    path = cache / "tiny-llama-random"
    if (path / "config.json").exists():
        return path
    from extmind.tiny_models import build_llama  # the lead's builder (tests use the same one)

    announce(f"building the default generator model (tiny random-weight Llama) in {path} ...")
    tmp = cache / f".tiny-llama-random.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    # ~0.8M parameters (3 MB): big enough for real multi-layer, multi-head retrieval, quick to load.
    build_llama(tmp, hidden=128, layers=4, heads=4, kv_heads=2, seed=0)
    os.replace(tmp, path)  # never leave a half-written model where the generator would load it
    return path


def generator_model(s: Settings, announce=print) -> str:
    if s.generator_model:
        return s.generator_model
    if (FACTS_MODEL / "model.safetensors").exists():
        announce(FACTS_MODEL_NOTICE)
        return str(FACTS_MODEL)
    announce(RANDOM_MODEL_NOTICE)
    return str(default_generator_model(s.model_cache, announce))


# ------------------------------------------------------------------ command lines

def service_specs(s: Settings, announce=print, names=ORDER) -> dict[str, ServiceSpec]:
    py = [sys.executable, "-m"]
    specs: dict[str, ServiceSpec] = {}
    if "embedder" in names:
        argv = py + ["services.embedder", "--port", str(s.embedder_port), "--http-port", str(s.embedder_http_port)]
        for m in filter(None, (x.strip() for x in s.embedder_model.split(","))):
            argv += ["--model", m]
        for m in filter(None, (x.strip() for x in s.embedder_reranker.split(","))):
            argv += ["--reranker", m]
        specs["embedder"] = ServiceSpec("embedder", argv, s.embedder_port,
                                        f"{_probe_host('EMBEDDER')}:{s.embedder_port}",
                                        {"http": s.embedder_http_port})
    if "memory" in names:
        argv = py + ["services.memory", "--port", str(s.memory_port), "--embedder-url", s.embedder_url,
                     "--data-dir", str(s.memory_data_dir)]
        if s.redis_url:
            argv += ["--redis-url", s.redis_url]
        specs["memory"] = ServiceSpec("memory", argv, s.memory_port, f"{_probe_host('MEMORY')}:{s.memory_port}",
                                      {"redis": s.redis_url or "embedded"})
    if "generator" in names:
        argv = py + ["services.generator", "--model", generator_model(s, announce), "--memory-url", s.memory_url,
                     "--port", str(s.generator_port)]
        specs["generator"] = ServiceSpec("generator", argv, s.generator_port,
                                         f"{_probe_host('GENERATOR')}:{s.generator_port}")
    return specs


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO), env.get("PYTHONPATH", "")) if x)
    env.setdefault("EXTMIND_LOG_FORMAT", "text")  # people read .run/logs; containers may set json
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# ------------------------------------------------------------------ processes

def _start_time(pid: int) -> str | None:
    """Kernel start time of ``pid`` (guards against a recycled pid), None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None
    except OSError:
        fields = None
    if fields is None:  # no /proc (macOS): fall back to a signal probe
        try:
            os.kill(pid, 0)
            return "?"
        except OSError:
            return None
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


@dataclass
class PidRecord:
    name: str
    pid: int
    start_time: str
    port: int
    argv: list[str]
    extra: dict

    def alive(self) -> bool:
        st = _start_time(self.pid)
        return st is not None and (st == self.start_time or "?" in (st, self.start_time))


def read_pid(s: Settings, name: str) -> PidRecord | None:
    try:
        data = json.loads(s.pid_file(name).read_text())
        return PidRecord(**data)
    except (FileNotFoundError, json.JSONDecodeError, TypeError):
        return None


def _write_pid(s: Settings, rec: PidRecord) -> None:
    tmp = s.pid_file(rec.name).with_suffix(".tmp")
    tmp.write_text(json.dumps(rec.__dict__))
    os.replace(tmp, s.pid_file(rec.name))


_ERROR_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*(?:Error|Exception|Exit)\w*: .+|\d\d:\d\d:\d\d [EC] .+)$")
_NOISE = ("Event loop is closed", "was never awaited")


def _this_run(path: Path) -> list[str]:
    """The log lines written since the launcher's last "=== ... starting:" marker."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return []
    starts = [i for i, x in enumerate(lines) if x.startswith("=== ") and " starting: " in x]
    return lines[starts[-1] + 1:] if starts else lines


def _why(path: Path, n: int = 8) -> str:
    """The last error line of this run that is not shutdown noise, else the log's tail."""
    lines = _this_run(path)
    if not lines:
        return "    (the log is empty)"
    errors = [x for x in lines if _ERROR_LINE.match(x.strip()) and not any(s in x for s in _NOISE)]
    if errors:  # the last one is the exception that ended the process
        return f"  reason: {errors[-1].strip()}"
    return "  last lines of the log:\n" + "\n".join("    " + x for x in lines[-n:])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def stop_process(rec: PidRecord, grace: float) -> str:
    """SIGTERM the service, SIGKILL its process group after ``grace``. -> what happened."""
    if not rec.alive():
        return "not running"
    pgid = rec.pid  # started with start_new_session: the service leads its own group
    os.kill(rec.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and rec.alive():
        time.sleep(0.1)
    how = "stopped"
    if rec.alive():
        how = f"killed after {grace:.0f}s grace"
    # Anything left in the group (the leader, or children such as an embedded redis-server whose
    # parent died) gets the same treatment: it was started on our behalf.
    if _group_alive(pgid):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        end = time.monotonic() + min(grace, 5.0)
        while time.monotonic() < end and _group_alive(pgid):
            time.sleep(0.1)
        if _group_alive(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return how


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
    return pid if b"redis" in cmd and _start_time(pid) is not None else None


def _redis_health(s: Settings) -> str:
    sock = s.memory_data_dir / "redis.sock"
    try:
        import redis
        return "PONG" if redis.Redis(unix_socket_path=str(sock), socket_timeout=1).ping() else "NO PONG"
    except Exception:
        return "UNREACHABLE"


class Cluster:
    def __init__(self, settings: Settings, out=print):
        self.s = settings
        self.out = out

    # -- up
    def up(self, names=ORDER) -> dict[str, PidRecord]:
        s = self.s
        s.logs.mkdir(parents=True, exist_ok=True)
        s.pids.mkdir(parents=True, exist_ok=True)
        s.memory_data_dir.mkdir(parents=True, exist_ok=True)
        running = {n: r for n in names if (r := read_pid(s, n)) is not None and r.alive()}
        to_start = [n for n in names if n not in running]
        for n, r in running.items():
            self.out(f"  {n:<10} already running (pid {r.pid})")
        specs = service_specs(s, self.out, to_start)
        started: dict[str, tuple[subprocess.Popen, PidRecord]] = {}
        env = child_env()
        try:
            for n in to_start:
                spec = specs[n]
                self._check_port_free(spec)
                log = open(s.log_file(n), "ab")
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(spec.argv)}\n".encode())
                log.flush()
                proc = subprocess.Popen(spec.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=str(REPO), env=env, start_new_session=True)
                log.close()
                rec = PidRecord(n, proc.pid, _start_time(proc.pid) or "?", spec.port, spec.argv, spec.extra)
                _write_pid(s, rec)
                started[n] = (proc, rec)
                self.out(f"  {n:<10} started (pid {proc.pid}, port {spec.port}, log {s.log_file(n)})")
            self._wait_serving(names, started)
        except BaseException:
            # Undo this attempt: stop what it started, all at once (nothing depends on them yet).
            stoppers = [threading.Thread(target=stop_process, args=(rec, min(s.stop_grace, 5.0)))
                        for _, rec in started.values()]
            for th in stoppers:
                th.start()
            for th in stoppers:
                th.join()
            for n in started:
                s.pid_file(n).unlink(missing_ok=True)
            raise
        return {n: rec for n, (_, rec) in started.items()} | running

    def _check_port_free(self, spec: ServiceSpec) -> None:
        import socket
        host, port = spec.probe.rsplit(":", 1)
        ports = [(int(port), f"{spec.name.upper()}_PORT")]
        if "http" in spec.extra:
            ports.append((int(spec.extra["http"]), f"{spec.name.upper()}_HTTP_PORT"))
        for number, var in ports:
            with socket.socket() as sock:
                sock.settimeout(0.5)
                if sock.connect_ex((host, number)) == 0:
                    raise LaunchError(f"{spec.name}: port {number} is already in use by another process "
                                      f"(not one started from this run dir); stop it or set {var}")

    def _wait_serving(self, names, started) -> None:
        s = self.s
        probes = {n: service_specs_probe(s, n) for n in names}
        t0 = time.monotonic()
        pending = list(names)
        while pending:
            for n in list(pending):
                if n in started and started[n][0].poll() is not None:
                    code = started[n][0].returncode
                    raise LaunchError(f"{n} exited with code {code} while starting (log: {s.log_file(n)})\n"
                                      f"{_why(s.log_file(n))}")
                if check(probes[n], timeout=1.0) == "SERVING":
                    pending.remove(n)
                    self.out(f"  {n:<10} SERVING after {time.monotonic() - t0:.1f}s")
            if pending and time.monotonic() - t0 > s.start_timeout:
                n = pending[0]
                raise LaunchError(f"{', '.join(pending)} not SERVING after {s.start_timeout:.0f}s "
                                  f"(EXTMIND_START_TIMEOUT; log: {s.log_file(n)})\n{_why(s.log_file(n))}")
            if pending:
                time.sleep(0.25)

    # -- down
    def down(self) -> list[tuple[str, str]]:
        s = self.s
        done = []
        extra = sorted(p.stem for p in s.pids.glob("*.pid") if p.stem not in ORDER) if s.pids.exists() else []
        names = list(reversed(ORDER)) + extra
        for n in names:
            rec = read_pid(s, n)
            if rec is None:
                continue
            how = stop_process(rec, s.stop_grace)
            s.pid_file(n).unlink(missing_ok=True)
            done.append((n, how))
            self.out(f"  {n:<10} {how} (pid {rec.pid})")
            if n == "memory":
                self._stop_embedded_redis()
        if not done:
            self.out(f"  nothing to stop (no pid files under {s.pids})")
        return done

    def _stop_embedded_redis(self) -> None:
        # The memory service stops its Redis on exit (and Linux SIGTERMs it when the service dies),
        # so this only acts when that did not happen: e.g. the service was SIGKILLed on macOS.
        deadline = time.monotonic() + 5.0
        while (pid := embedded_redis_pid(self.s)) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid is None:
            return
        rec = PidRecord("redis", pid, _start_time(pid) or "?", 0, [], {})
        os.kill(pid, signal.SIGTERM)
        end = time.monotonic() + self.s.stop_grace
        while rec.alive() and time.monotonic() < end:
            time.sleep(0.1)
        if rec.alive():
            os.kill(pid, signal.SIGKILL)
        self.out(f"  {'redis':<10} stopped (pid {pid}, left behind by the memory service)")

    # -- status
    def status(self) -> list[dict]:
        s = self.s
        rows = []
        if not s.redis_url:
            pid = embedded_redis_pid(s)
            rows.append({"service": "redis", "port": "unix", "pid": str(pid) if pid else "-",
                         "process": "running" if pid else "not running",
                         "health": _redis_health(s) if pid else "UNREACHABLE",
                         "extra": f"embedded in memory, AOF in {s.memory_data_dir}"})
        for n in ORDER:
            rec = read_pid(s, n)
            probe = service_specs_probe(s, n)
            rows.append({
                "service": n,
                "port": probe.rsplit(":", 1)[1],
                "pid": str(rec.pid) if rec else "-",
                "process": ("running" if rec.alive() else "dead") if rec else "not started",
                "health": check(probe, timeout=1.0),
                "extra": ", ".join(f"{k} {v}" for k, v in ((rec.extra if rec else None) or {}).items()),
            })
        return rows


def service_specs_probe(s: Settings, name: str) -> str:
    port = {"embedder": s.embedder_port, "memory": s.memory_port, "generator": s.generator_port}[name]
    rec = read_pid(s, name)
    if rec is not None:
        port = rec.port  # what was actually started, even if the environment changed since
    return f"{_probe_host(name.upper())}:{port}"


def format_table(rows: list[dict]) -> str:
    cols = ["service", "port", "pid", "process", "health", "extra"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    line = lambda r: "  ".join(str(r[c]).ljust(width[c]) for c in cols).rstrip()
    return "\n".join([line({c: c.upper() for c in cols})] + [line(r) for r in rows])


# ------------------------------------------------------------------ entry point

def _help_epilog() -> str:
    return "environment variables:\n" + "\n".join(f"  {k:<22} [{d or 'unset'}] {m}" for k, (d, m) in ENV_VARS.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m extmind.cluster", description="Start, stop and inspect the "
                                "local extmind cluster.", epilog=_help_epilog(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("command", choices=["up", "down", "status", "exec"])
    p.add_argument("service", nargs="?", choices=ORDER, help="for exec: the service to run in the foreground")
    p.add_argument("--run-dir", default=None, help="logs, pid files and data live here [$EXTMIND_RUN_DIR or .run]")
    a = p.parse_args(argv)
    try:
        s = Settings.from_env(a.run_dir)
        c = Cluster(s)
        if a.command == "up":
            print(f"extmind: starting the cluster (run dir {s.run_dir})")
            c.up()
            print("extmind: all services SERVING  "
                  f"(embedder {s.embedder_url}, memory {s.memory_url}, generator {s.generator_url}; "
                  f"HTTP http://127.0.0.1:{s.embedder_http_port})")
        elif a.command == "down":
            print(f"extmind: stopping the cluster (run dir {s.run_dir})")
            c.down()
        elif a.command == "status":
            rows = c.status()
            print(format_table(rows))
            return 0 if all(r["health"] in ("SERVING", "PONG") for r in rows) else 1
        else:
            if not a.service:
                p.error("exec needs a service name: embedder, memory or generator")
            spec = service_specs(s, lambda m: print(m, file=sys.stderr), [a.service])[a.service]
            os.execve(spec.argv[0], spec.argv, child_env())
    except LaunchError as e:
        print(f"extmind: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("extmind: interrupted; started services were stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
