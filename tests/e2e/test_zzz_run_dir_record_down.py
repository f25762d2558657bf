"""`down` removes <run dir>/cluster.json: no client is sent to a cluster that is gone. (Named to run
after test_zz_lifecycle; calls `down` itself, which is idempotent, so it also holds when run alone.)"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_down_removes_the_record(cluster):
    r = cluster.launcher("down")
    assert r.returncode == 0, r.stderr
    assert not (cluster.run_dir / "cluster.json").exists()
    assert (cluster.run_dir / "logs").is_dir()  # only the record goes; logs stay for reading
