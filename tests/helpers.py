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


# Raw protobuf bytes, written here independently of extmind/row_wire.py (which the tests that use
# them check against protobuf): a client's library may send what the generated code never does.
def pb_varint(n: int) -> bytes:
    """``n`` (>= 0; a negative int64 is passed as n + 2**64) as a protobuf varint."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def pb_len_field(number: int, body: bytes) -> bytes:
    """A length-delimited field (wire type 2): tag, length, ``body``."""
    return pb_varint(number << 3 | 2) + pb_varint(len(body)) + body


def pb_tensor(dtype: int, dims, data: bytes) -> bytes:
    """An extmind.v1.Tensor: dtype (field 1), packed shape (2), data (3)."""
    return b"\x08" + pb_varint(dtype) + pb_len_field(2, b"".join(pb_varint(d) for d in dims)) + pb_len_field(3, data)
