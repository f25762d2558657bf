"""Killing a service makes its dependants answer UNAVAILABLE; they recover once it is back."""

from __future__ import annotations

import time

import grpc
import pytest

from extmind.channels import sync_channel
from extmind.cluster_pids import read_pid
from extmind.healthcheck import check
from extmind.procs import stop_process
from extmind.v1 import generator_pb2, generator_pb2_grpc, memory_pb2, memory_pb2_grpc
from tests.helpers import code_of

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def kill(cluster, name: str) -> None:
    rec = read_pid(cluster.settings(), name)
    assert rec is not None and rec.alive(), f"{name} is not running"
    stop_process(rec.pid, 0)  # SIGKILL: a crash
    assert not rec.alive()
    assert check(cluster.url(name)) == "UNREACHABLE"


def eventually_ok(fn, what: str, timeout: float = 60.0):
    """The dependant reconnects on its own (gRPC reconnect backoff): poll until it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:
                raise AssertionError(f"{what} did not recover: {e.code().name}: {e.details()}") from None
        time.sleep(0.5)


def restart(cluster, name: str) -> None:
    r = cluster.launcher("up")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{name:<10} started" in r.stdout, r.stdout
    assert r.stdout.count("already running") == 2, r.stdout  # only the dead one was started


def test_memory_down_generator_unavailable_then_recovers(cluster):
    gen_ch, mem_ch = sync_channel(cluster.url("generator")), sync_channel(cluster.url("memory"))
    gen, mem = generator_pb2_grpc.GeneratorServiceStub(gen_ch), memory_pb2_grpc.MemoryServiceStub(mem_ch)
    text = "The ferry to the island leaves at seven and returns at noon, every day except Sunday."
    before = gen.Memorize(generator_pb2.MemorizeRequest(text=text, memory_id="fo-before"), timeout=120)
    with_memory = lambda mid, mode=generator_pb2.RETRIEVAL_MODE_LOCAL: generator_pb2.GenerateRequest(  # noqa: E731
        prompt="When does the ferry leave?",
        sampling=generator_pb2.SamplingParams(max_tokens=4),
        extended_mind=generator_pb2.ExtendedMind(memory_ids=[mid], mode=mode),
    )

    kill(cluster, "memory")
    code, msg = code_of(gen.Memorize, generator_pb2.MemorizeRequest(text=text, memory_id="fo-during"), timeout=60)
    assert code == grpc.StatusCode.UNAVAILABLE, (code, msg)
    assert msg  # says what is down
    # Remote retrieval asks the memory service every step; local retrieval of a memory the
    # generator has not cached must fetch it first (a cached bank may legitimately still serve).
    for mid, mode in (
        ("fo-before", generator_pb2.RETRIEVAL_MODE_REMOTE),
        ("fo-never-loaded", generator_pb2.RETRIEVAL_MODE_LOCAL),
    ):
        code, msg = code_of(gen.Generate, with_memory(mid, mode), timeout=60)
        assert code == grpc.StatusCode.UNAVAILABLE, (mid, mode, code, msg)
    # The generator itself is still up: a call that needs no memory works.
    plain = gen.Generate(
        generator_pb2.GenerateRequest(prompt="hello", sampling=generator_pb2.SamplingParams(max_tokens=3)), timeout=60
    )
    # the default model may end its answer (a newline is one of its end tokens) before the limit
    assert 1 <= plain.usage.completion_tokens <= 3
    assert check(cluster.url("generator")) == "SERVING"

    restart(cluster, "memory")
    # Nothing acknowledged was lost: the memory made before the crash is still READY.
    got = eventually_ok(
        lambda: mem.GetMemory(memory_pb2.GetMemoryRequest(memory_id="fo-before"), timeout=30), "memory service"
    )
    assert got.memory.state == memory_pb2.MEMORY_STATE_READY and got.memory.num_tokens == before.num_rows
    after = eventually_ok(
        lambda: gen.Memorize(generator_pb2.MemorizeRequest(text=text, memory_id="fo-after"), timeout=120),
        "generator Memorize",
    )
    assert after.num_rows == before.num_rows
    for mid in ("fo-before", "fo-after"):
        r = eventually_ok(lambda mid=mid: gen.Generate(with_memory(mid), timeout=120), "generator Generate with memory")
        assert 1 <= r.usage.completion_tokens <= 4
    for mid in ("fo-before", "fo-after"):
        mem.DeleteMemory(memory_pb2.DeleteMemoryRequest(memory_id=mid), timeout=30)
    gen_ch.close()
    mem_ch.close()


def test_embedder_down_document_calls_unavailable_then_recover(cluster):
    ch = sync_channel(cluster.url("memory"))
    mem = memory_pb2_grpc.MemoryServiceStub(ch)
    doc = memory_pb2.Document(id="fo-doc", text="Owls hunt at night.")
    upsert = memory_pb2.UpsertDocumentsRequest(collection="fo-docs", documents=[doc])
    search = memory_pb2.SearchDocumentsRequest(collection="fo-docs", query="nocturnal birds", top_k=1)
    mem.UpsertDocuments(upsert, timeout=60)

    kill(cluster, "embedder")
    for fn, req in ((mem.UpsertDocuments, upsert), (mem.SearchDocuments, search)):
        code, msg = code_of(fn, req, timeout=60)
        assert code == grpc.StatusCode.UNAVAILABLE, (code, msg)
    assert check(cluster.url("memory")) == "SERVING"

    restart(cluster, "embedder")
    eventually_ok(lambda: mem.UpsertDocuments(upsert, timeout=60), "memory UpsertDocuments")
    hits = eventually_ok(lambda: mem.SearchDocuments(search, timeout=60), "memory SearchDocuments").hits
    assert [h.id for h in hits] == ["fo-doc"]
    ch.close()
