"""Small helpers any test may use (process helpers live in ``extmind/procs.py``, shared with the
benchmarks; fixtures in the ``conftest.py`` files)."""

from __future__ import annotations

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
