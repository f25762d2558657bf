"""A memory deleted and created again under its id, with as many rows, between the generator
resolving it (GetMemory) and fetching its rows (FetchMemory): the create_time every FetchMemory
answer carries tells the two apart, so the new rows are never used, nor cached, under the old
memory's metadata. The engine resolves such a memory again once; a memory that keeps changing is
FAILED_PRECONDITION. Real memory service, real Redis, real gRPC, real tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from extmind import errors
from extmind.v1 import memory_pb2
from services.generator.bank_cache import fetch_bank
from services.generator.memory_client import MemoryChanged
from services.generator.request_types import GenerationRequest, MemoryOptions, Sampling

from .helpers import run
from .memory_helpers import recreate_memory


def test_fetch_refuses_the_rows_of_a_memory_created_again_with_as_many_rows(engine, client, fresh):
    mid = fresh("inc-same-size")
    before = client.fetch_stored(mid, engine.num_layers)
    resolved = engine.resolver.resolve((mid,))[0]
    recreate_memory(client, mid, mid, reverse=True)
    again = engine.resolver.resolve((mid,))[0]
    assert again.rows == resolved.rows and again.dtype == resolved.dtype  # only create_time differs
    assert again.version != resolved.version

    handed = []
    with pytest.raises(MemoryChanged, match="deleted and created again since this request resolved it") as e:
        engine.resolver.fetch(resolved, on_layer=lambda *a: handed.append(a))
    assert e.value.code == "FAILED_PRECONDITION" and not handed  # refused before any row was used
    with pytest.raises(MemoryChanged, match="created again"):
        fetch_bank(engine.resolver, resolved, engine.mlx)
    assert engine.mlx.call(engine.bank_cache.get, mid, resolved.version, lookup=False) is None

    # Resolved again, the new memory's rows come back: the old rows reversed.
    rows = engine.resolver.fetch(again)
    for layer in range(engine.num_layers):
        assert np.array_equal(rows.keys[layer], before.keys[layer][:, ::-1])
        assert np.array_equal(rows.values[layer], before.values[layer][:, ::-1])


async def test_a_generation_resolves_a_memory_created_again_once_more(engine, client, fresh, monkeypatch):
    """The memory is created again right after the request resolved it: the engine's fetch sees
    another create_time, resolves again, and the answer is exactly that of the new rows (a twin
    memory holding them); the bank cache holds the new memory under its own version only."""
    mid, twin = fresh("inc-retry"), fresh("inc-retry-twin")
    recreate_memory(client, twin, twin, reverse=True)  # the rows the memory will hold after its re-creation
    prompt = engine.tokenizer.encode("Who met Bob?")

    def request(i: str) -> GenerationRequest:
        return GenerationRequest(prompt, Sampling(max_tokens=6), MemoryOptions((i,), top_k=2), return_logprobs=True)

    real = engine.resolver.resolve
    calls = []

    def resolve_then_recreate(ids, **kw):
        out = real(ids, **kw)
        calls.append(out[0].version)
        if len(calls) == 1:
            recreate_memory(client, mid, mid, reverse=True)
        return out

    monkeypatch.setattr(engine.resolver, "resolve", resolve_then_recreate)
    got = await run(engine, request(mid))
    monkeypatch.setattr(engine.resolver, "resolve", real)
    assert len(calls) == 2 and calls[0] != calls[1]
    want = await run(engine, request(twin))
    assert got[0] == want[0] and got[1] == want[1]
    assert engine.resolver.resolve((mid,))[0].version == calls[1]
    cached = engine.mlx.call(engine.bank_cache.get, mid, calls[1], lookup=False)  # one bank per id
    assert cached is not None and cached.version == calls[1]


async def test_a_memory_that_keeps_changing_is_failed_precondition(engine, client, fresh, monkeypatch):
    mid = fresh("inc-twice")
    prompt = engine.tokenizer.encode("Who met Bob?")
    real = engine.resolver.resolve

    def resolve_then_recreate(ids, **kw):
        out = real(ids, **kw)
        recreate_memory(client, mid, mid, reverse=True)
        return out

    monkeypatch.setattr(engine.resolver, "resolve", resolve_then_recreate)
    with pytest.raises(errors.FailedPrecondition, match="created again since this request resolved it"):
        await run(engine, GenerationRequest(prompt, Sampling(max_tokens=2), MemoryOptions((mid,))))
    monkeypatch.setattr(engine.resolver, "resolve", real)
    # still serving, the memory too
    assert len((await run(engine, GenerationRequest(prompt, Sampling(max_tokens=2), MemoryOptions((mid,)))))[0]) == 2


def test_an_older_memory_service_without_create_time_is_not_checked():
    """A FetchMemory answer without create_time (a memory service older than the field) is used
    as before; one with another create_time is refused."""
    from google.protobuf.timestamp_pb2 import Timestamp

    from services.generator.memory_client import check_incarnation

    want = Timestamp(seconds=10, nanos=5)
    check_incarnation("m", want, memory_pb2.FetchMemoryResponse())
    check_incarnation("m", want, memory_pb2.FetchMemoryResponse(create_time=want))
    check_incarnation("m", None, memory_pb2.FetchMemoryResponse(create_time=Timestamp(seconds=11)))
    for other in (Timestamp(seconds=10, nanos=6), Timestamp(seconds=11, nanos=5), Timestamp()):
        with pytest.raises(MemoryChanged):
            check_incarnation("m", want, memory_pb2.FetchMemoryResponse(create_time=other))
