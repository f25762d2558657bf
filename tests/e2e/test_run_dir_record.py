"""`up` records what it started in <run dir>/cluster.json; the CLI and `status` find the cluster
through it from a shell that exported nothing (no ports, no URLs), via EXTMIND_RUN_DIR."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from extmind.cluster_config import find_run_dir

from .cluster import _SCRUB, REPO, cluster_env, patched_environ

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

_PORTS = (
    "EMBEDDER_PORT",
    "EMBEDDER_HTTP_PORT",
    "MEMORY_PORT",
    "MEMORY_HTTP_PORT",
    "GENERATOR_PORT",
    "GENERATOR_HTTP_PORT",
)


def bare_env(cluster, **extra) -> dict:
    """The cluster's environment without anything that says where it runs."""
    env = {k: v for k, v in cluster.env.items() if k not in _SCRUB and k not in _PORTS}
    return dict(env, **extra)


def test_up_records_its_urls_and_a_bare_shell_finds_them(cluster, tmp_path):
    record = json.loads((cluster.run_dir / "cluster.json").read_text())
    for name in ("embedder", "memory", "generator"):
        assert record[f"{name}_url"] == cluster.url(name), record
    env = bare_env(cluster, EXTMIND_RUN_DIR=str(cluster.run_dir))
    r = subprocess.run(
        [sys.executable, "-m", "extmind.cli", "embed", "found without ports", "--json"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["embeddings"]) == 1
    r = subprocess.run(
        [sys.executable, "-m", "extmind.cli", "status"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    for name in ("embedder", "memory", "generator"):
        assert rows[name][1] == cluster.url(name).rsplit(":", 1)[1] and rows[name][3:5] == ["running", "SERVING"]
    assert rows["redis"][3:5] == ["running", "PONG"], r.stdout
    # `make status` reads the same run dir from EXTMIND_RUN_DIR (dry run: it would install first).
    r = subprocess.run(
        ["make", "--no-print-directory", "-n", "status"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert f"-m extmind.cluster status --run-dir {cluster.run_dir}" in r.stdout, r.stdout
    st = subprocess.run(
        [sys.executable, "-m", "extmind.cluster", "status", "--run-dir", str(cluster.run_dir)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert st.returncode == 0, st.stdout + st.stderr


def test_the_test_clusters_clients_find_its_run_dir_not_the_checkouts(tmp_path):
    # With a `make up` of the developer's running in this checkout (REPO/.run/cluster.json), a
    # client started in the test cluster's env (the demo, the CLI) used that cluster instead.
    env = cluster_env(tmp_path / "run", tmp_path / "models")
    with patched_environ(env):
        assert find_run_dir() == (tmp_path / "run").resolve()
