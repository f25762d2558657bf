"""MemorizeStream's progress and the access log, through ``python -m services.generator`` over real
gRPC with a real memory service, and ``extmind memorize`` as a process against them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from extmind.service_procs import ServiceProcess
from extmind.v1 import generator_pb2 as g
from extmind.v1 import generator_pb2_grpc, memory_pb2

from .helpers import start_generator

REPO = Path(__file__).resolve().parents[2]
TEXT = " ".join(
    f"Fact {i}: the {w} river runs past town number {i}."
    for i, w in enumerate(["red", "blue", "green", "grey", "long", "slow", "cold", "wide"] * 3)
)


@pytest.fixture(scope="module")
def services(tmp_path_factory, llama_path, module_memory_service):
    d = tmp_path_factory.mktemp("progress")
    mem = module_memory_service
    # Small windows and prefill chunks: a short text takes several windows of several chunks.
    gen = start_generator(
        d / "logs", llama_path, mem.address, "--window", "32", "--stride", "16", "--prefill-step-size", "8"
    )
    yield gen, mem
    gen.stop()


@pytest.fixture(scope="module")
def stub(services):
    ch = services[0].channel()
    yield generator_pb2_grpc.GeneratorServiceStub(ch)
    ch.close()


def _state(mem, memory_id: str) -> int:
    return mem.stub().GetMemory(memory_pb2.GetMemoryRequest(memory_id=memory_id), timeout=10).memory.state


def test_memorize_stream_reports_monotonic_progress_then_what_memorize_returns(stub, services):
    _, mem = services
    req = g.MemorizeRequest(text=TEXT, memory_id="streamed", window=24, stride=8)
    events = list(stub.MemorizeStream(g.MemorizeStreamRequest(request=req), timeout=120))
    progress = [e.progress for e in events[:-1]]
    assert all(e.HasField("progress") for e in events[:-1]) and events[-1].HasField("done")
    done = events[-1].done
    n = progress[0].tokens_total
    assert n == done.num_tokens and n > 3 * 24
    windows = progress[0].windows_total
    assert windows == 1 + -(-(n - 24) // 8)  # the first window, then one per stride until the end
    # One report before the first window, then one per prefill chunk of 8 tokens of every window.
    assert len(progress) == 1 + sum(-(-(min(i * 8 + 24, n) - i * 8) // 8) for i in range(windows))
    assert progress[0].tokens_done == 0 and progress[0].windows_done == 0 and progress[0].eta_seconds == 0
    for a, b in zip(progress, progress[1:]):
        assert a.tokens_done <= b.tokens_done and a.windows_done <= b.windows_done
        assert a.elapsed_seconds <= b.elapsed_seconds
        assert b.tokens_total == n and b.windows_total == windows
    assert progress[-1].tokens_done == n and progress[-1].windows_done == windows
    assert progress[-1].eta_seconds == 0
    assert any(0 < p.tokens_done < n and p.eta_seconds > 0 for p in progress)

    plain = stub.Memorize(g.MemorizeRequest(text=TEXT, memory_id="plain", window=24, stride=8), timeout=120)
    assert (done.num_tokens, done.num_rows, done.model_fingerprint) == (
        plain.num_tokens,
        plain.num_rows,
        plain.model_fingerprint,
    )
    assert done.memory_id == "streamed"
    assert _state(mem, "streamed") == memory_pb2.MEMORY_STATE_READY


def test_memorize_stream_errors_as_memorize(stub):
    for req, code in [
        (g.MemorizeRequest(), grpc.StatusCode.INVALID_ARGUMENT),
        (g.MemorizeRequest(text="x", token_ids=[1]), grpc.StatusCode.INVALID_ARGUMENT),
        (g.MemorizeRequest(text="Some text.", window=8, stride=16), grpc.StatusCode.INVALID_ARGUMENT),
        (g.MemorizeRequest(text="Some text.", memory_id="streamed"), grpc.StatusCode.ALREADY_EXISTS),
    ]:
        with pytest.raises(grpc.RpcError) as e:
            list(stub.MemorizeStream(g.MemorizeStreamRequest(request=req), timeout=60))
        assert e.value.code() == code, (req, e.value.details())
        with pytest.raises(grpc.RpcError) as e2:
            stub.Memorize(req, timeout=60)
        assert e2.value.code() == code


def test_cancelling_the_stream_stops_the_build_and_leaves_no_memory(stub, services):
    _, mem = services
    req = g.MemorizeRequest(text=TEXT * 4, memory_id="cancelled", window=24, stride=4)
    call = stub.MemorizeStream(g.MemorizeStreamRequest(request=req), timeout=120)
    first = [next(call), next(call)]
    assert all(e.HasField("progress") for e in first)
    assert first[-1].progress.tokens_done < first[-1].progress.tokens_total
    call.cancel()
    deadline = time.monotonic() + 30
    while True:  # the build stops at its next chunk and deletes what it created
        try:
            _state(mem, "cancelled")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND, e.details()
            break
        assert time.monotonic() < deadline, "the cancelled memorize's memory is still there"
        time.sleep(0.1)
    _wait_for(services[0], r"method=/extmind\.v1\.GeneratorService/MemorizeStream code=CANCELLED ")


def _wait_for(svc: ServiceProcess, pattern: str, timeout: float = 10.0) -> str:
    """The first log line matching ``pattern`` (the line is written as the call ends, which can
    be just after the client has its answer)."""
    deadline = time.monotonic() + timeout
    while True:
        for line in svc.log_tail(400).splitlines():
            if re.search(pattern, line):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no log line matches {pattern!r}:\n{svc.log_tail()}")
        time.sleep(0.1)


def test_every_call_gets_one_access_line(stub, services):
    gen, mem = services
    r = stub.Generate(g.GenerateRequest(prompt="The river", sampling=g.SamplingParams(max_tokens=3)), timeout=60)
    line = _wait_for(gen, r"extmind\.rpc: rpc method=/extmind\.v1\.GeneratorService/Generate code=OK ")
    assert re.search(r"duration_ms=\d+(\.\d+)? ", line), line
    assert f"prompt_tokens={r.usage.prompt_tokens} completion_tokens={r.usage.completion_tokens}" in line
    m = stub.Memorize(g.MemorizeRequest(text="The lake is deep.", memory_id="logged"), timeout=60)
    _wait_for(gen, rf"method=/extmind\.v1\.GeneratorService/Memorize code=OK duration_ms=\S+ tokens={m.num_tokens}$")
    # The memory service's calls from that Memorize, and a failed call with its code.
    _wait_for(mem, r"method=/extmind\.v1\.MemoryService/AppendMemory code=OK duration_ms=")
    with pytest.raises(grpc.RpcError):
        stub.Generate(g.GenerateRequest(), timeout=30)
    line = _wait_for(gen, r"method=/extmind\.v1\.GeneratorService/Generate code=INVALID_ARGUMENT ")
    assert "error=" in line
    generate_lines = [x for x in gen.log_tail(400).splitlines() if "GeneratorService/Generate " in x]
    assert len(generate_lines) == 2, generate_lines  # one line per call, not one per event


def test_cli_memorize_prints_a_line_per_tenth_when_not_a_tty(services, tmp_path):
    gen, mem = services
    f = tmp_path / "notes.txt"
    f.write_text(TEXT * 3)
    env = dict(
        os.environ, GENERATOR_URL=gen.address, MEMORY_URL=mem.address, EXTMIND_AUTH_TOKEN="", PYTHONPATH=str(REPO)
    )
    p = subprocess.run(
        [sys.executable, "-m", "extmind.cli", "memorize", str(f), "--id", "from-cli"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    lines = [x for x in p.stderr.splitlines() if x.startswith("memorize ")]
    assert 3 <= len(lines) <= 11, p.stderr
    assert "\r" not in p.stderr
    pcts = [float(re.search(r"(\d+\.\d)%", x).group(1)) for x in lines]
    assert pcts == sorted(pcts) and pcts[-1] == 100.0, lines
    assert any(re.search(r" \d+/\d+ tokens", x) for x in lines), lines
    m = re.search(r"from-cli: (\d+) tokens, (\d+) memory rows", p.stdout)
    assert m, p.stdout
    assert _state(mem, "from-cli") == memory_pb2.MEMORY_STATE_READY
