"""gRPC health probe: ``python -m extmind.healthcheck host:port [--service NAME]``.

Exit 0 when the server answers SERVING, 1 otherwise (one line on stderr says why). Used by the
launcher's readiness wait and by docker-compose health checks, so both mean the same thing.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extmind.channels import auth_metadata, sync_channel


def check(target: str, service: str = "", timeout: float = 2.0) -> str:
    """-> "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", ..., "UNREACHABLE" (no answer) or
    "INVALID_URL" (``target`` is no gRPC target: ``extmind.channels.parse_target``)."""
    try:
        with sync_channel(target) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout, metadata=auth_metadata()
            )
            return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.NOT_FOUND:
            return "SERVICE_UNKNOWN"
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            return "UNAUTHENTICATED"
        return "UNREACHABLE"
    except ValueError:
        return "INVALID_URL"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m extmind.healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("target", help="host:port of a gRPC server")
    p.add_argument("--service", default="", help="service name to ask about ('' = the whole server)")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    a = p.parse_args(argv)
    status = check(a.target, a.service, a.timeout)
    if status == "SERVING":
        return 0
    print(f"{a.target}: {status}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
