"""Launcher lifecycle: idempotent `up`, readable start failures, the container entry point, and
`down` leaving nothing running (on a cluster of its own, so the tests may run in any order)."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from extmind.cluster_config import ORDER
from extmind.cluster_pids import embedded_redis_pid, read_pid, stop_service
from extmind.healthcheck import check
from extmind.procs import free_port, stop_process

from .cluster import REPO, ClusterHandle, cli, cluster_env, started_cluster

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_healthcheck_module(cluster):
    s = cluster.settings()
    ok = subprocess.run(
        [sys.executable, "-m", "extmind.healthcheck", s.memory_url],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    named = subprocess.run(
        [sys.executable, "-m", "extmind.healthcheck", s.generator_url, "--service", "extmind.v1.GeneratorService"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert named.returncode == 0, named.stderr
    dead = free_port()
    bad = subprocess.run(
        [sys.executable, "-m", "extmind.healthcheck", f"127.0.0.1:{dead}"],
        env=cluster.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert bad.returncode == 1 and bad.stderr.strip() == f"127.0.0.1:{dead}: UNREACHABLE"


def test_memory_http_port_serves_health_and_metrics(cluster):
    """`up` starts the memory service with MEMORY_HTTP_PORT; `status` shows it."""
    import urllib.request

    s = cluster.settings()
    base = f"http://127.0.0.1:{s.memory_http_port}"
    with urllib.request.urlopen(f"{base}/health", timeout=10) as r:
        assert r.status == 200 and r.read() == b'{"status":"ok"}'
    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "extmind_memory_memories " in text and "extmind_grpc_requests_total" in text
    st = cluster.launcher("status")
    assert f"http {s.memory_http_port}" in st.stdout, st.stdout


def test_the_generator_http_face_is_up_and_in_status(cluster):
    s = cluster.settings()
    st = cluster.launcher("status")
    assert st.returncode == 0 and f"http {s.generator_http_port}" in st.stdout, st.stdout
    for path in ("/health", "/v1/models"):
        conn = http.client.HTTPConnection("127.0.0.1", s.generator_http_port, timeout=30)
        conn.request("GET", path)
        r = conn.getresponse()
        body = json.loads(r.read())
        conn.close()
        assert r.status == 200, (path, body)
    assert body["data"][0]["id"] == "extmind-facts-6m" and body["data"][0]["model_fingerprint"]


def up_with(cluster, **env: str):
    """`up` with ``env`` on top of the cluster's environment, restored afterwards."""
    saved = {k: cluster.env.get(k) for k in env}
    cluster.env.update(env)
    try:
        return cluster.launcher("up")
    finally:
        for k, v in saved.items():
            if v is None:
                cluster.env.pop(k)
            else:
                cluster.env[k] = v


def test_up_again_starts_nothing_new(cluster):
    before = {n: read_pid(cluster.settings(), n).pid for n in ORDER}
    r = cluster.launcher("up")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("already running") == 3 and "other settings" not in r.stdout, r.stdout
    assert {n: read_pid(cluster.settings(), n).pid for n in ORDER} == before


def test_up_again_with_other_settings_says_so(cluster, tmp_path):
    """`GENERATOR_MODEL=... make up` on a running cluster keeps the running generator: it says so
    and names the flag, instead of silently serving the old model."""
    before = {n: read_pid(cluster.settings(), n).pid for n in ORDER}
    r = up_with(cluster, GENERATOR_MODEL=str(tmp_path / "another-model"))
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if "other settings" in ln]
    assert len(lines) == 1 and "generator" in lines[0], r.stdout
    assert f"--model {tmp_path / 'another-model'}" in lines[0] and "make down" in lines[0], lines
    assert {n: read_pid(cluster.settings(), n).pid for n in ORDER} == before


def test_up_again_with_a_setting_only_in_the_environment_says_so(cluster):
    """A variable the launcher does not pass as a flag (the service reads it itself) is compared
    too: `GENERATOR_MERGE_PROJECTIONS=on make up` on a running cluster names it."""
    r = up_with(cluster, GENERATOR_MERGE_PROJECTIONS="on", EMBEDDER_MAX_QUEUE="7")
    assert r.returncode == 0, r.stderr
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if "other settings" in ln}
    assert sorted(lines) == ["embedder", "generator"], r.stdout
    assert "GENERATOR_MERGE_PROJECTIONS differs in the environment" in lines["generator"], lines
    assert "EMBEDDER_MAX_QUEUE differs in the environment" in lines["embedder"], lines
    r = cluster.launcher("up")
    assert r.returncode == 0 and "other settings" not in r.stdout, r.stdout


def test_up_again_reports_the_running_ports_not_the_new_ones(cluster):
    """Ports changed in the environment of a second `up` wait for a `make down`: its summary line
    and cluster.json name where the running services listen, not the ports they were not given."""
    emb = read_pid(cluster.settings(), "embedder")
    gen = read_pid(cluster.settings(), "generator")
    new = {"EMBEDDER_PORT": str(free_port()), "EMBEDDER_HTTP_PORT": str(free_port())}
    r = up_with(cluster, **new)
    assert r.returncode == 0, r.stderr
    assert "embedder" in next(ln for ln in r.stdout.splitlines() if "other settings" in ln), r.stdout
    summary = next(ln for ln in r.stdout.splitlines() if "all services SERVING" in ln)
    assert f"embedder 127.0.0.1:{emb.port}," in summary, summary
    assert f"HTTP: embedder http://127.0.0.1:{emb.extra['http']}," in summary, summary
    assert f"generator (OpenAI) http://127.0.0.1:{gen.extra['http']}/v1" in summary, summary
    assert not any(port in summary for port in new.values()), summary
    record = json.loads((cluster.run_dir / "cluster.json").read_text())
    assert record["embedder_url"] == f"127.0.0.1:{emb.port}", record
    assert record["embedder_http_url"] == f"http://127.0.0.1:{emb.extra['http']}", record
    assert record["generator_http_url"] == f"http://127.0.0.1:{gen.extra['http']}", record


def test_up_restarting_a_service_points_it_at_the_running_ones(cluster):
    """A memory service that `up` restarts beside the running embedder, in an environment whose
    EMBEDDER_PORT changed, calls the embedder where it runs (nothing listens on the new port until
    a `make down`): documents still get embedded."""
    emb = read_pid(cluster.settings(), "embedder")
    mem = read_pid(cluster.settings(), "memory")
    assert stop_service(mem, 10) == "stopped"
    new = {"EMBEDDER_PORT": str(free_port()), "EMBEDDER_HTTP_PORT": str(free_port())}
    r = up_with(cluster, **new)
    assert r.returncode == 0, r.stdout + r.stderr
    restarted = read_pid(cluster.settings(), "memory")
    assert restarted.pid != mem.pid and f"memory     started (pid {restarted.pid}" in r.stdout, r.stdout
    argv = restarted.argv
    assert argv[argv.index("--embedder-url") + 1] == f"127.0.0.1:{emb.port}", argv
    up = cli(cluster, "docs", "upsert", "restarted-memory", "cats=Cats purr and chase mice.")
    assert up.returncode == 0 and "upserted 1" in up.stdout, up.stdout + up.stderr


def test_failed_start_is_one_readable_error_and_cleans_up(tmp_path, model_cache):
    h = ClusterHandle(tmp_path / "run", cluster_env(tmp_path / "run", model_cache))
    h.env["GENERATOR_MODEL"] = str(tmp_path / "no-such-model")
    r = h.launcher("up", timeout=300)
    assert r.returncode == 1, r.stdout + r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("extmind: generator exited with code") and "generator.log" in first, r.stderr
    # The cause from the service's log, not its traceback: the model path that does not exist.
    reason = r.stderr.splitlines()[1]
    assert reason.startswith("  reason: ") and "no-such-model" in reason, r.stderr
    assert "Traceback" not in r.stderr
    # What this attempt started was stopped again, and it says so; no pid files are left.
    assert "stopped what this up started: embedder, memory, generator" in r.stdout, r.stdout
    assert not list((tmp_path / "run" / "pids").glob("*.pid"))
    s = h.settings()
    for port in (s.embedder_port, s.memory_port, s.generator_port):
        assert not _port_open(port), port


def test_exec_runs_one_service_in_the_foreground(tmp_path, model_cache):
    """The container entry point: `python -m extmind.cluster exec memory` is the service itself."""
    env = cluster_env(tmp_path, model_cache)
    env["MEMORY_DATA_DIR"] = str(tmp_path / "mem")
    proc = subprocess.Popen(
        [sys.executable, "-m", "extmind.cluster", "exec", "memory"],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        target = f"127.0.0.1:{env['MEMORY_PORT']}"
        deadline = time.monotonic() + 120
        while check(target) != "SERVING":
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "exec memory never became SERVING"
            time.sleep(0.25)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        stop_process(proc, 0)


@pytest.fixture
def own_cluster(tmp_path, model_cache):
    """A cluster only this test uses: stopping it takes nothing away from the other tests."""
    handle = started_cluster(tmp_path / "run", model_cache)
    yield handle
    handle.launcher("down")


def test_down_leaves_nothing_running(own_cluster):
    cluster = own_cluster
    s = cluster.settings()
    pids = [read_pid(s, n).pid for n in ORDER]
    redis_pid = embedded_redis_pid(s)
    assert redis_pid is not None, "the memory service's embedded redis-server is not running"
    pids.append(redis_pid)
    assert all(_alive(p) for p in pids)
    assert (cluster.run_dir / "cluster.json").exists()
    r = cluster.launcher("down")
    assert r.returncode == 0, r.stderr
    # the record goes with the cluster: no client is sent to a cluster that is gone
    assert not (cluster.run_dir / "cluster.json").exists()
    for n in ORDER:
        assert f"{n:<10} stopped" in r.stdout, r.stdout  # SIGTERM was enough: clean shutdowns
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)]
    assert not list((cluster.run_dir / "pids").glob("*.pid"))
    for port in (
        s.embedder_port,
        s.embedder_http_port,
        s.memory_port,
        s.memory_http_port,
        s.generator_port,
        s.generator_http_port,
    ):
        assert not _port_open(port), port
    st = cluster.launcher("status")
    assert st.returncode == 1 and st.stdout.count("not started") == 3, st.stdout
    again = cluster.launcher("down")
    assert again.returncode == 0 and "nothing to stop" in again.stdout
    # Logs stay for reading after the fact.
    assert all((cluster.run_dir / "logs" / f"{n}.log").stat().st_size > 0 for n in ORDER)
    assert os.path.isdir(cluster.run_dir / "data" / "memory")
