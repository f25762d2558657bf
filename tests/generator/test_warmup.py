"""The start-up warm-up (services/generator/warmup.py): runs every request path through the real
engine and memory service, leaves no memory behind, and never keeps the service from serving."""

from __future__ import annotations

import asyncio

import pytest

from extmind.procs import free_port
from services.generator import warmup
from services.generator.app import parse_args
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.memory_client import MemoryClient
from services.generator.request_types import GenerationRequest, Sampling
from services.generator.warmup import wanted, warm_up

from .helpers import run


@pytest.fixture(scope="module")
def memory_address(module_memory_service):
    return module_memory_service.address


async def test_warm_up_runs_every_path_and_leaves_no_memory(llama_path, memory_address):
    engine = GeneratorEngine(EngineConfig(model=str(llama_path), memory_url=memory_address))
    engine.start()
    client = MemoryClient(memory_address)
    try:
        before = {m.memory_id for m in client.list_memories()[0]}
        took = await warm_up(engine, batch=4)
        assert took["skipped"] == "" and {"plain", "memorize", "local", "remote"} <= set(took)
        assert {m.memory_id for m in client.list_memories()[0]} == before
        assert engine.stats()["active"] == 0
        tokens, _, _, final = await run(engine, GenerationRequest([5, 6, 7], Sampling(max_tokens=4)))
        assert len(tokens) == final.completion_tokens > 0
    finally:
        client.close()
        engine.stop()


async def test_warm_up_fits_a_queue_smaller_than_its_batch(llama_path, memory_address):
    # --max-queue 2 with the default batch of 8: the batched stage ran into RESOURCE_EXHAUSTED.
    engine = GeneratorEngine(EngineConfig(model=str(llama_path), memory_url=memory_address, max_queue=2))
    engine.start()
    try:
        took = await warm_up(engine, batch=8)
        assert took["skipped"] == "" and {"local", "remote"} <= set(took), took
        assert engine.stats()["active"] == 0
    finally:
        engine.stop()


async def test_warm_up_deletes_a_warm_up_memory_left_behind(llama_path, memory_address, monkeypatch):
    # A start killed mid-warm-up leaves its READY memory; no reaper deletes READY memories, and
    # each crash-looping start added one more.
    engine = GeneratorEngine(EngineConfig(model=str(llama_path), memory_url=memory_address))
    engine.start()
    client = MemoryClient(memory_address)
    try:
        left = engine.memorize_blocking(list(range(5, 40)), labels={"kind": "warm-up"})["memory_id"]
        kept = engine.memorize_blocking(list(range(5, 40)), labels={"kind": "warm-up", "mine": "1"})["memory_id"]
        took = await warm_up(engine, batch=2)
        assert took["skipped"] == "" and left in {m.memory_id for m in client.list_memories()[0]}  # young
        monkeypatch.setattr(warmup, "STALE_SECONDS", 0, raising=False)
        took = await warm_up(engine, batch=2)
        ids = {m.memory_id for m in client.list_memories()[0]}
        assert took["skipped"] == "" and left not in ids and kept in ids
    finally:
        client.close()
        engine.stop()


async def test_warm_up_without_a_memory_service_warms_what_it_can(llama_path):
    nobody = f"127.0.0.1:{free_port()}"
    engine = GeneratorEngine(EngineConfig(model=str(llama_path), memory_url=nobody, memory_timeout=2))
    engine.start()
    try:
        took = await warm_up(engine)
        assert "plain" in took and "memorize" not in took
        assert took["skipped"].startswith("memory service unavailable")
    finally:
        engine.stop()


def test_warmup_flag(monkeypatch, capsys):
    assert parse_args(["--model", "m"]).warmup == "auto"
    assert parse_args(["--model", "m", "--warmup", "off"]).warmup == "off"
    assert wanted("on") and not wanted("off")
    # From the environment, a value outside the flag's choices stops the start in one line.
    for env, raw, says in (
        ("GENERATOR_WARMUP", "sometimes", "use one of auto, on, off"),
        ("GENERATOR_DTYPE", "float64", "use one of auto, model, float32, float16, bfloat16"),
    ):
        monkeypatch.setenv(env, raw)
        with pytest.raises(SystemExit) as e:
            parse_args(["--model", "m"])
        assert e.value.code == 2 and f"{env}={raw!r} is not valid: {says}" in capsys.readouterr().err
        monkeypatch.delenv(env)


async def test_warm_up_ends_at_its_budget(llama_path, memory_address):
    engine = GeneratorEngine(EngineConfig(model=str(llama_path), memory_url=memory_address))
    engine.start()
    client = MemoryClient(memory_address)
    try:
        took = await warm_up(engine, budget=0.0)  # no stage can finish in no time
        assert took["skipped"] == "did not finish in 0 s"
        # what was cut off cleans up behind it: no warm-up memory stays, the engine serves
        for _ in range(100):
            if not [m for m in client.list_memories()[0] if dict(m.labels) == {"kind": "warm-up"}]:
                break
            await asyncio.sleep(0.1)
        assert not [m for m in client.list_memories()[0] if dict(m.labels) == {"kind": "warm-up"}]
        tokens, _, _, _ = await run(engine, GenerationRequest([5, 6, 7], Sampling(max_tokens=3)))
        assert len(tokens) == 3
    finally:
        client.close()
        engine.stop()
