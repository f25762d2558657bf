"""The health file the containers probe: present and fresh while SERVING, gone once draining."""

from __future__ import annotations

import subprocess
import time

from extmind.service_procs import ServiceProcess


def _fresh(path, seconds: int) -> bool:
    # exactly the container's probe (docker-compose.yml)
    out = subprocess.run(["find", str(path), "-newermt", f"{seconds} seconds ago"], capture_output=True, text=True)
    return out.stdout.strip() == str(path)


def test_health_file_tracks_serving(tmp_path):
    path = tmp_path / "run" / "serving"
    svc = ServiceProcess(
        "services.memory",
        ["--data-dir", str(tmp_path / "data"), "--log-format", "text"],
        env={"REDIS_URL": "", "EXTMIND_HEALTH_FILE": str(path)},
        log_dir=tmp_path,
        health_service="extmind.v1.MemoryService",
    )
    try:
        svc.start()
        deadline = time.monotonic() + 10
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _fresh(path, 20)
        first = path.stat().st_mtime
        time.sleep(5.5)  # the server touches it every 5 s
        assert path.stat().st_mtime > first and _fresh(path, 20)
        assert svc.stop() == 0
        assert not path.exists() and not _fresh(path, 20)
    finally:
        svc.stop()
