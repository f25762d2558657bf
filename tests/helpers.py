"""Small helpers any test may use (process helpers live in ``extmind/procs.py``, shared with the
benchmarks; fixtures in the ``conftest.py`` files)."""

from __future__ import annotations

import time
from typing import NamedTuple

import grpc


class RpcOutcome(NamedTuple):
    code: grpc.StatusCode
    details: str


def code_of(fn, *args, **kwargs) -> RpcOutcome:
    """Calls ``fn(*args, **kwargs)`` (an RPC, or a lambda making some) -> its status code and
    details: those of the ``grpc.RpcError`` it raised, or ``(StatusCode.OK, "")`` when it
    succeeded (so an assertion on an error code fails for a call that did not fail). A streaming
    answer must be consumed inside ``fn`` (e.g. ``lambda: list(stub.FetchMemory(...))``)."""
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as e:
        return RpcOutcome(e.code(), e.details() or "")
    return RpcOutcome(grpc.StatusCode.OK, "")


def access_lines(svc, method: str) -> list[str]:
    """The access-log lines a service process (``svc.log_path``) wrote for gRPC ``method``
    ("/extmind.v1.MemoryService/SearchMemoryStream")."""
    return [x for x in svc.log_path.read_text().splitlines() if f"method={method} " in x]


def wait_for_access_line(svc, method: str, index: int, timeout: float = 10.0) -> str:
    """Access line number ``index`` (0-based) of ``method``, once the service wrote it (a
    stream's line comes when the stream ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = access_lines(svc, method)
        if len(lines) > index:
            return lines[index]
        time.sleep(0.05)
    raise AssertionError(f"no access line {index} for {method}:\n{svc.log_tail()}")
