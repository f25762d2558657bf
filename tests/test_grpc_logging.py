"""gRPC's C core prints no INFO lines in our processes: importing extmind sets GRPC_VERBOSITY to
ERROR unless the environment says otherwise (a stray INFO line once preceded the launcher's one
error line)."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A health call over loopback with gRPC's http tracing on: its INFO lines show unless suppressed.
SCRIPT = """
import extmind, grpc
from concurrent import futures
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
s = grpc.server(futures.ThreadPoolExecutor(1))
health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), s)
port = s.add_insecure_port("127.0.0.1:0")
s.start()
with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
    print(health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status)
s.stop(0)
"""


def _run(extra: dict) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"} | {"GRPC_TRACE": "http"} | extra
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=60)


def test_importing_extmind_silences_grpc_info_lines():
    r = _run({})
    assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr
    assert not [line for line in r.stderr.splitlines() if line.startswith("I")], r.stderr[:2000]


def test_a_verbosity_the_user_sets_is_kept():
    """Not vacuous: with GRPC_VERBOSITY=INFO the same run prints the traced INFO lines."""
    r = _run({"GRPC_VERBOSITY": "INFO"})
    assert r.returncode == 0, r.stderr
    assert [line for line in r.stderr.splitlines() if line.startswith("I")], r.stderr[:2000]
