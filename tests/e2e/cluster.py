"""A cluster started and stopped through the same launcher as `make up` (``python -m
extmind.cluster``), on free ports and its own run directory, for the end-to-end tests.

Ports are free ones picked here (so the suite never collides with a developer's `make up` or with
other tests), and the defaults are used for models: the offline all-MiniLM-L6-v2 embedder and the
launcher-built random-weight Llama generator (built once into ``model_cache``).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from extmind.cluster_config import Settings
from extmind.procs import free_ports

REPO = Path(__file__).resolve().parents[2]
# Variables that would point the test cluster somewhere else than its own processes.
_SCRUB = (
    "REDIS_URL",
    "EMBEDDER_MODEL",
    "GENERATOR_MODEL",
    "EMBEDDER_URL",
    "MEMORY_URL",
    "GENERATOR_URL",
    "MEMORY_DATA_DIR",
    "EXTMIND_AUTH_TOKEN",
    "MLX_SERVICE_URL",
    "EMBEDDER_HOST",
    "MEMORY_HOST",
    "GENERATOR_HOST",
    "EXTMIND_RUN_DIR",
)


@contextlib.contextmanager
def patched_environ(env: dict):
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(old)


@dataclass
class ClusterHandle:
    run_dir: Path
    env: dict

    def launcher(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "extmind.cluster", *args, "--run-dir", str(self.run_dir)],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def settings(self) -> Settings:
        with patched_environ(self.env):
            return Settings.from_env(self.run_dir)

    def url(self, name: str) -> str:
        return getattr(self.settings(), f"{name}_url")


def cli(cluster, *args, env=None, input=None, timeout=300) -> subprocess.CompletedProcess:
    """``extmind *args`` (the CLI) against ``cluster`` (its environment, or ``env``), text captured."""
    return subprocess.run(
        [sys.executable, "-m", "extmind.cli", *args],
        env=env or cluster.env,
        cwd=REPO,
        capture_output=True,
        text=True,
        input=input,
        timeout=timeout,
    )


def cluster_env(run_dir: Path, model_cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUB}
    ep, hp, mp, mhp, gp, ghp = free_ports(6)
    env.update(
        EMBEDDER_PORT=str(ep),
        EMBEDDER_HTTP_PORT=str(hp),
        MEMORY_PORT=str(mp),
        MEMORY_HTTP_PORT=str(mhp),
        GENERATOR_PORT=str(gp),
        GENERATOR_HTTP_PORT=str(ghp),
        EXTMIND_MODEL_CACHE=str(model_cache),
        EXTMIND_START_TIMEOUT="300",
        EXTMIND_STOP_GRACE="10",
        PYTHONPATH=str(REPO),
        # The CLI and the demo run in this env find their cluster through the run dir's record;
        # unset, they would fall back to the checkout's .run, i.e. the developer's own `make up`.
        EXTMIND_RUN_DIR=str(run_dir),
    )
    return env


def started_cluster(run_dir: Path, model_cache: Path) -> ClusterHandle:
    """`cluster up` on free ports under ``run_dir``. Fails the test (with the launcher's output)
    when it does not come up; the caller runs ``launcher("down")``."""
    handle = ClusterHandle(run_dir, cluster_env(run_dir, model_cache))
    up = handle.launcher("up")
    assert up.returncode == 0, f"`cluster up` failed:\n{up.stdout}\n{up.stderr}"
    return handle
