"""scripts/install-system.sh (run by `make install`): which packages it installs and that it stops
only a redis-server it installed itself, with dpkg-query, apt-get, systemctl and service faked on
PATH (the fakes log their arguments)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "install-system.sh"
PACKAGES = ("redis-server", "libopenblas0-pthread", "docker-compose")


def _fake(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def run(tmp_path: Path, installed: tuple[str, ...]) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs the script as root on a fake Debian where ``installed`` are the packages present ->
    (the result, the logged calls of apt-get, systemctl and service)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    log.write_text("")
    _fake(bin_dir, "uname", "echo Linux")
    _fake(bin_dir, "id", "echo 0")
    present = " ".join(installed)
    _fake(bin_dir, "dpkg-query", f'for p in {present}; do [ "$p" = "$3" ] && echo "install ok installed"; done')
    for tool in ("apt-get", "systemctl", "service"):
        _fake(bin_dir, tool, f'echo "{tool} $*" >> {log}')
    grep = shutil.which("grep")
    (bin_dir / "grep").symlink_to(grep)
    r = subprocess.run(
        [shutil.which("bash"), str(SCRIPT)],
        env={"PATH": str(bin_dir)},
        capture_output=True,
        text=True,
        timeout=30,
    )
    return r, log.read_text().splitlines()


def test_nothing_missing_touches_nothing(tmp_path):
    r, calls = run(tmp_path, PACKAGES)
    assert r.returncode == 0 and calls == [], (r.stderr, calls)


def test_a_redis_server_that_was_there_is_left_running(tmp_path):
    # The user's own Redis (installed before) must survive installing docker-compose.
    r, calls = run(tmp_path, ("redis-server", "libopenblas0-pthread"))
    assert r.returncode == 0, r.stderr
    assert "install-system: installing docker-compose" in r.stderr + r.stdout
    assert [c for c in calls if c.startswith("apt-get install")] == [
        "apt-get install -y -qq --no-install-recommends docker-compose"
    ]
    assert not [c for c in calls if "redis-server" in c], calls


def test_a_redis_server_it_installed_is_stopped(tmp_path):
    # Debian starts the packaged Redis on :6379; the project runs its own.
    r, calls = run(tmp_path, ("libopenblas0-pthread",))
    assert r.returncode == 0, r.stderr
    assert "apt-get install -y -qq --no-install-recommends redis-server docker-compose" in calls
    assert "systemctl disable --now redis-server" in calls and "service redis-server stop" in calls
