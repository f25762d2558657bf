"""What every ``extmind`` command shares: its errors (:class:`CliError`, :class:`UsageError`), the
services it talks to (:class:`Targets`), the per-call timeout, small text helpers and the one line a
failed gRPC call prints (:func:`rpc_error_line`)."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import grpc

from extmind.channels import auth_metadata, sync_channel
from extmind.cli_args import _short  # noqa: F401 - the commands take it from here
from extmind.cluster_config import ENV_VARS, Settings, find_run_dir, read_record
from extmind.errors import from_rpc_error
from extmind.v1 import embedder_pb2_grpc, generator_pb2_grpc, memory_pb2_grpc


def _timeout_from_env() -> tuple[float, str]:
    """(seconds per call, "" or the one-line complaint about EXTMIND_CLI_TIMEOUT that main prints)."""
    raw = os.environ.get("EXTMIND_CLI_TIMEOUT", "").strip() or "600"
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        return 600.0, f"EXTMIND_CLI_TIMEOUT={raw!r} must be a positive number of seconds"
    return value, ""


TIMEOUT, _TIMEOUT_PROBLEM = _timeout_from_env()


class CliError(Exception):
    """A one-line, user-facing failure (exit code 1)."""

    exit_code = 1


class UsageError(CliError):
    """A wrong command line (exit code 2, like argparse's own errors): options that cannot work
    together, an argument not in its form (``key=value``, ``id=text``), as argparse exits 2 for
    ``--top-k abc``. Content that is wrong (a file's, an empty prompt) is a CliError: exit code 1."""

    exit_code = 2


def _read_text(name: str) -> str:
    """The text of file ``name`` ('-' = stdin) as UTF-8; CliError naming the file otherwise."""
    try:
        if name == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        return Path(name).read_bytes().decode("utf-8")
    except OSError as e:
        raise CliError(f"cannot read {name}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise CliError(
            f"{'stdin' if name == '-' else name} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at "
            f"offset {e.start}); convert it first, e.g. `iconv -f latin1 -t utf-8`"
        ) from None


def _md() -> tuple:
    return auth_metadata()


class Targets:
    def __init__(self, run_dir: str | None = None):
        self.run_dir = find_run_dir(run_dir)
        self.s = Settings.from_env(self.run_dir, use_record=True)
        self._chans = {}
        self.last = ""  # the service of the stub taken last: the one an RpcError came from

    def origin(self, service: str) -> str:
        """Where the service's URL came from, for error messages."""
        env = f"{service.upper()}_URL"  # EMBEDDER_URL, MEMORY_URL, GENERATOR_URL
        if os.environ.get(env, "").strip():
            return env
        record = self.run_dir / "cluster.json"
        return str(record) if f"{service}_url" in read_record(self.run_dir) else f"default; no {record}"

    def _chan(self, service: str):
        self.last = service
        url = getattr(self.s, f"{service}_url")
        if url not in self._chans:
            try:
                self._chans[url] = sync_channel(url)
            except ValueError as e:
                raise CliError(f"the {service} service's URL [{self.origin(service)}]: {e}") from None
        return self._chans[url]

    @property
    def embedder(self):
        return embedder_pb2_grpc.EmbedderServiceStub(self._chan("embedder"))

    @property
    def memory(self):
        return memory_pb2_grpc.MemoryServiceStub(self._chan("memory"))

    @property
    def generator(self):
        return generator_pb2_grpc.GeneratorServiceStub(self._chan("generator"))


def counted(n: int, noun: str) -> str:
    """'1 token', '2 tokens': ``n`` and ``noun`` (singular) with its plural ``s`` when n != 1."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


# ------------------------------------------------------------------ errors

# The services' messages name RPCs; a person at the CLI types commands.
_RPC_COMMANDS = {
    "ListMemories": "`extmind memories list`",
    "GetMemory": "`extmind memories show`",
    "DeleteMemory": "`extmind memories delete`",
    "CreateMemory": "`extmind memorize`",
    "CreateCollection": "`extmind docs create`",
    "UpsertDocuments": "`extmind docs upsert`",
    "ListCollections": "`extmind docs collections`",
    "DeleteCollection": "`extmind docs drop`",
    "SearchDocuments": "`extmind docs search`",
    "DeleteDocuments": "`extmind docs delete`",
    "GenerateStream": "`extmind generate`",
}
_RPC_NAME = re.compile(r"\b(" + "|".join(_RPC_COMMANDS) + r")\b")


def _undouble(message: str) -> str:
    """ "memory 'x': memory 'x' does not exist" -> "memory 'x' does not exist" (a caller's prefix
    that the callee's message already says)."""
    while True:
        head, sep, rest = message.partition(": ")
        if not (sep and head and head in rest):
            return message
        message = rest


# How gRPC's own transport describes a call that never reached a server (or lost it): its
# UNAVAILABLE details start so. A service's own UNAVAILABLE (a peer behind it is down) starts with
# the service's words, which may quote such a failure further on.
_TRANSPORT_FAILURE = re.compile(
    r"(failed to connect|connections to all backends failing|DNS resolution failed|errors resolving|Socket closed|"
    r"Connection reset|Connection refused|Broken pipe|Ssl handshake|GOAWAY|Stream removed|recvmsg|sendmsg|"
    r"Endpoint read failed|Transport closed|Cancelling all calls|Failed parsing HTTP/2|empty address list)",
    re.IGNORECASE,
)


def rpc_error_line(exc: grpc.RpcError, service: str, url: str, origin: str = "") -> str:
    """The one line (without "extmind: ") that a failed call to ``service`` at ``url`` prints:
    "CODE: what happened; what to do", the code as :func:`extmind.errors.from_rpc_error` names it.
    ``origin`` says where ``url`` came from (shown when the service cannot be reached)."""
    peer = f"{service} service at {url}"
    err = from_rpc_error(exc, peer=peer, as_dependency=False)
    raw = (exc.details() if hasattr(exc, "details") else "") or ""
    detail = _RPC_NAME.sub(lambda m: _RPC_COMMANDS[m.group(1)], _undouble(" ".join(err.message.split())))
    where = f" [{origin}]" if origin else ""
    if err.code == "UNAVAILABLE" and "Failed parsing HTTP/2" in detail:
        # Something listens there but speaks HTTP/1: most often a service's HTTP port (8000-8002).
        port = f"{service.upper()}_PORT"
        detail = (
            f"{url}{where} is not a gRPC server (it answers in HTTP/1, as the services' HTTP ports do); "
            f"the {service}'s gRPC port is {ENV_VARS[port][0]} unless {port} says otherwise"
        )
    elif err.code == "UNAVAILABLE" and not _TRANSPORT_FAILURE.match(raw):
        # The service answered: what it lacks is behind it (a peer it calls), and its message says what.
        detail = f"the {peer}{where} answered: {detail}"
    elif err.code == "UNAVAILABLE":
        detail = f"cannot reach the {peer}{where} ({detail}); is the cluster up? `make up`, `extmind status`"
        if re.fullmatch(r"grpcs?://[^:/]+/?", url.strip(), re.IGNORECASE):  # gRPC's default port, likely unmeant
            detail += f"; {url} names no port, so gRPC tried 443"
    elif err.code == "DEADLINE_EXCEEDED":
        detail = f"the {peer} did not answer within {TIMEOUT:g}s (EXTMIND_CLI_TIMEOUT)"
    elif err.code == "UNAUTHENTICATED":
        detail = f"the {peer} refused the credentials ({detail}); set EXTMIND_AUTH_TOKEN to its token"
    return f"{err.code}: {detail}"
