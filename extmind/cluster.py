"""The local cluster launcher: ``python -m extmind.cluster up|down|status|exec [--run-dir DIR]``.

``up`` starts the embedder, memory (which runs its own Redis unless REDIS_URL is set) and generator
services as background processes, each with a log and a pid file under one run directory
(default ``.run/``), waits until every gRPC health check says SERVING, and records the URLs it
used in ``<run dir>/cluster.json`` so that the ``extmind`` CLI and ``status`` find the cluster from
any shell (explicit ``*_URL`` variables still win; ``down`` removes the record). ``down`` stops exactly
the processes named by the pid files (SIGTERM, then SIGKILL after a grace). ``status`` prints a
table. ``exec NAME`` runs one service in the foreground with the same command line (containers).

Configuration (environment variables, defaults in brackets) is listed in
``extmind.cluster_config.ENV_VARS`` and by ``python -m extmind.cluster --help``. Pid files and
stopping live in ``extmind.cluster_pids``, the ``status`` rows and table in ``extmind.cluster_status``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import threading
import time

from extmind import procs
from extmind.cluster_config import (
    ENV_VARS,
    ORDER,
    REPO,
    LaunchError,
    ServiceSpec,
    Settings,
    addresses,
    as_started,
    child_env,
    env_digests,
    service_specs,
    url_given,
    write_record,
)
from extmind.cluster_pids import (
    PidRecord,
    embedded_redis_pid,
    exit_reason,
    read_pid,
    service_specs_probe,
    stop_service,
    write_pid,
)

# grpc (healthcheck, cluster_status) is imported where `up` and `status` need it: `down` runs on the
# standard library alone, so that `make clean` can stop a cluster whose venv is broken or gone.


def _flags(argv) -> dict[str, str]:
    """``--flag value`` pairs of a service command line (a flag without a value maps to "")."""
    return {a: (b if not b.startswith("--") else "") for a, b in zip(argv, [*argv[1:], "--"]) if a.startswith("--")}


class Cluster:
    """``up``, ``down`` and ``status`` of the services of one run dir (``settings.run_dir``);
    ``out`` gets one line per step."""

    def __init__(self, settings: Settings, out=print):
        self.s = settings
        self.out = out

    # -- up
    def up(self, names=ORDER) -> dict[str, PidRecord]:
        s = self.s
        _check_urls()
        s.logs.mkdir(parents=True, exist_ok=True)
        s.pids.mkdir(parents=True, exist_ok=True)
        s.memory_data_dir.mkdir(parents=True, exist_ok=True)
        running = {n: r for n in names if (r := read_pid(s, n)) is not None and r.alive()}
        to_start = [n for n in names if n not in running]
        changed = self._changed_settings(running)
        for n, r in running.items():
            why = changed.get(n)
            note = f"; started with other settings ({why}): `make down` first to apply them" if why else ""
            self.out(f"  {n:<10} already running (pid {r.pid}){note}")
        specs = service_specs(self._settings_for_new(running), self.out, to_start)
        started: dict[str, tuple[subprocess.Popen, PidRecord]] = {}
        env = child_env(s.run_dir)
        try:
            for n in to_start:
                spec = specs[n]
                self._check_port_free(spec)
                log = open(s.log_file(n), "ab")
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(spec.argv)}\n".encode())
                log.flush()
                proc = subprocess.Popen(
                    spec.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=str(REPO),
                    env=env,
                    start_new_session=True,
                )
                log.close()
                rec = PidRecord(
                    n,
                    proc.pid,
                    procs.start_time(proc.pid) or "?",
                    spec.port,
                    spec.argv,
                    spec.extra,
                    env_digests(n, env, spec.argv),
                )
                write_pid(s, rec)
                started[n] = (proc, rec)
                self.out(f"  {n:<10} started (pid {proc.pid}, port {spec.port}, log {s.log_file(n)})")
            self._wait_serving(names, started)
        except BaseException:
            # Undo this attempt: stop what it started, all at once (nothing depends on them yet).
            stoppers = [
                threading.Thread(target=stop_service, args=(rec, min(s.stop_grace, 5.0), proc))
                for proc, rec in started.values()
            ]
            for th in stoppers:
                th.start()
            for th in stoppers:
                th.join()
            for n in started:
                s.pid_file(n).unlink(missing_ok=True)
            if started:
                self.out(f"  stopped what this up started: {', '.join(started)}")
            raise
        recs = {n: rec for n, (_, rec) in started.items()} | running
        write_record(s, recs)
        return recs

    def _settings_for_new(self, running: dict[str, PidRecord]) -> Settings:
        """The settings of the services this ``up`` starts: one that calls a running service (memory
        the embedder, the generator memory) reaches it where it listens (its pid record), not at a
        port of this ``up``'s environment that waits for a ``make down``. ``*_URL`` set still wins."""
        moved = {
            f"{n}_url": f"127.0.0.1:{running[n].port}"
            for n in ("embedder", "memory")
            if n in running and not url_given(n)
        }
        return dataclasses.replace(self.s, **moved)

    def _changed_settings(self, running: dict[str, PidRecord]) -> dict[str, str]:
        """name -> the settings a running service was started with that differ from what this ``up``
        would start it with: its command line, and its flags' variables in the environment
        (``GENERATOR_MODEL=... make up`` or ``GENERATOR_MERGE_PROJECTIONS=on make up`` on a running
        cluster would otherwise keep the old setting without a word). A service started before
        its pid file recorded variables is compared by its command line only."""
        try:
            want = service_specs(self.s, lambda *a, **k: None, list(running))
        except LaunchError:
            return {}
        env = child_env(self.s.run_dir)
        changed = {}
        for n, r in running.items():
            why = []
            if n in want and list(r.argv[1:]) != want[n].argv[1:]:
                was = _flags(r.argv)
                now = [f"{k} {v}".strip() for k, v in _flags(want[n].argv).items() if was.get(k) != v]
                why.append("this up would pass " + ", ".join(now) if now else "other flags")
            if r.env is not None:
                digests = env_digests(n, env, want[n].argv if n in want else r.argv)
                moved = sorted(v for v in r.env.keys() | digests.keys() if r.env.get(v) != digests.get(v))
                if moved:
                    why.append(f"{', '.join(moved)} {'differs' if len(moved) == 1 else 'differ'} in the environment")
            if why:
                changed[n] = "; ".join(why)
        return changed

    def _check_port_free(self, spec: ServiceSpec) -> None:
        import socket

        host, port = spec.probe.rsplit(":", 1)
        ports = [(int(port), f"{spec.name.upper()}_PORT")]
        if int(spec.extra.get("http", -1)) > 0:  # -1 = off, 0 = any free port
            ports.append((int(spec.extra["http"]), f"{spec.name.upper()}_HTTP_PORT"))
        for number, var in ports:
            with socket.socket() as sock:
                sock.settimeout(0.5)
                if sock.connect_ex((host, number)) == 0:
                    raise LaunchError(
                        f"{spec.name}: port {number} is already in use by another process "
                        f"(not one started from this run dir); stop it or set {var}"
                    )

    def _wait_serving(self, names, started) -> None:
        from extmind.healthcheck import check

        s = self.s
        probes = {n: service_specs_probe(s, n) for n in names}
        t0 = time.monotonic()
        pending = list(names)
        while pending:
            for n in list(pending):
                if n in started and started[n][0].poll() is not None:
                    code = started[n][0].returncode
                    raise LaunchError(
                        f"{n} exited with code {code} while starting (log: {s.log_file(n)})\n"
                        f"{exit_reason(s.log_file(n))}"
                    )
                if check(probes[n], timeout=1.0) == "SERVING":
                    pending.remove(n)
                    self.out(f"  {n:<10} SERVING after {time.monotonic() - t0:.1f}s")
            if pending and time.monotonic() - t0 > s.start_timeout:
                n = pending[0]
                raise LaunchError(
                    f"{', '.join(pending)} not SERVING after {s.start_timeout:.0f}s "
                    f"(EXTMIND_START_TIMEOUT; log: {s.log_file(n)})\n{exit_reason(s.log_file(n))}"
                )
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
            how = stop_service(rec, s.stop_grace)
            s.pid_file(n).unlink(missing_ok=True)
            done.append((n, how))
            self.out(f"  {n:<10} {how} (pid {rec.pid})")
            if n == "memory":  # its Redis is where it was started, whatever the environment says now
                self._stop_embedded_redis(as_started(s, rec.argv))
        if not done:
            self.out(f"  nothing to stop (no pid files under {s.pids})")
        s.record_file.unlink(missing_ok=True)  # no cluster to find here any more
        return done

    def _stop_embedded_redis(self, s: Settings) -> None:
        # The memory service stops its Redis on exit (and Linux SIGTERMs it when the service dies),
        # so this only acts when that did not happen: e.g. the service was SIGKILLed on macOS.
        deadline = time.monotonic() + 5.0
        while (pid := embedded_redis_pid(s)) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid is None:
            return
        procs.stop_process(pid, self.s.stop_grace)
        self.out(f"  {'redis':<10} stopped (pid {pid}, left behind by the memory service)")

    # -- status
    def status(self) -> list[dict]:
        """One row per part: see ``extmind.cluster_status.status_rows``."""
        from extmind.cluster_status import status_rows

        return status_rows(self.s)


# ------------------------------------------------------------------ entry point


def _help_epilog() -> str:
    return "environment variables:\n" + "\n".join(f"  {k:<22} [{d or 'unset'}] {m}" for k, (d, m) in ENV_VARS.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m extmind.cluster",
        description="Start, stop and inspect the local extmind cluster.",
        epilog=_help_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("command", choices=["up", "down", "status", "exec"])
    p.add_argument("service", nargs="?", choices=ORDER, help="for exec: the service to run in the foreground")
    p.add_argument("--run-dir", default=None, help="logs, pid files and data live here [$EXTMIND_RUN_DIR or .run]")
    a = p.parse_args(argv)
    try:
        s = Settings.from_env(a.run_dir, use_record=a.command == "status")
        c = Cluster(s)
        if a.command == "up":
            print(f"extmind: up: starting what is not running (run dir {s.run_dir})")
            at = addresses(s, c.up())  # the running services' own ports, not the environment's

            def face(name: str, path: str = "") -> str:
                port = at[f"{name}_http_port"]
                return f"http://127.0.0.1:{port}{path}" if port > 0 else ("off" if port < 0 else "a free port")

            print(
                "extmind: all services SERVING  "
                f"(embedder {at['embedder_url']}, memory {at['memory_url']}, generator {at['generator_url']}; "
                f"HTTP: embedder {face('embedder')}, generator (OpenAI) {face('generator', '/v1')}"
                + (f"; memory metrics {face('memory', '/metrics')}" if at["memory_http_port"] >= 0 else "")
                + ")"
            )
        elif a.command == "down":
            print(f"extmind: stopping the cluster (run dir {s.run_dir})")
            c.down()
        elif a.command == "status":
            from extmind.cluster_status import format_table, status_ok

            rows = c.status()
            print(format_table(rows))
            return 0 if status_ok(rows) else 1
        else:
            if not a.service:
                p.error("exec needs a service name: embedder, memory or generator")
            spec = service_specs(s, lambda m: print(m, file=sys.stderr), [a.service])[a.service]
            os.execve(spec.argv[0], spec.argv, child_env())  # no kernel folder under a container's run dir
    except LaunchError as e:
        print(f"extmind: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("extmind: interrupted; started services were stopped", file=sys.stderr)
        return 130
    return 0


def _check_urls() -> None:
    """Raises LaunchError naming the first ``*_URL`` set that is no gRPC target, before anything
    starts (a service would refuse it at its start, after the others were up)."""
    from extmind.channels import parse_target  # grpc: `down` needs only the standard library

    for name in ORDER:
        value = url_given(name)
        if value:
            try:
                parse_target(value)
            except ValueError as e:
                raise LaunchError(f"{name.upper()}_URL: {e}") from None


if __name__ == "__main__":
    sys.exit(main())
