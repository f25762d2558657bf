"""Models loaded on demand (--allow-load) under a parameter-memory budget (--model-memory-gb):
loading at the first request, least-recently-used unloading, never unloading a busy model,
requests waiting on a load, the refusal messages and the listings (GetInfo, /v1/models).

Three copies of the tiny Qwen3-Embedding checkpoint stand for qwen3-0.6b, qwen3-4b and qwen3-8b
(MLX_MODELS_DIR), so all weigh the same and a budget of 2.5 of them holds two.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import shutil
import threading

import grpc
import mlx.core as mx
import numpy as np
import pytest

from extmind.errors import DeadlineExceeded, FailedPrecondition, NotFound, ResourceExhausted
from extmind.v1 import embedder_pb2 as pb
from extmind.v1 import embedder_pb2_grpc
from services.common.mlx_thread import MLXThread
from services.embedder import registry
from services.embedder.engine import EmbedderEngine
from services.embedder.pool import LoadPolicy

from .http_client import call

A, B, C = "Qwen/Qwen3-Embedding-0.6B", "Qwen/Qwen3-Embedding-4B", "Qwen/Qwen3-Embedding-8B"


@pytest.fixture
def models_dir(tmp_path, monkeypatch, tiny_qwen3, tiny_reranker):
    for alias in ("qwen3-0.6b", "qwen3-4b", "qwen3-8b"):
        (tmp_path / alias).symlink_to(tiny_qwen3, target_is_directory=True)
    (tmp_path / "qwen3-reranker-4b").symlink_to(tiny_reranker, target_is_directory=True)
    for var in ("MLX_MODEL_QWEN3_0_6B_PATH", "MLX_MODEL_QWEN3_4B_PATH", "MLX_MODEL_QWEN3_8B_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("MLX_MODEL_QWEN3_RERANKER_4B_PATH", raising=False)
    monkeypatch.setenv("MLX_MODELS_DIR", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.fixture
async def engine_with(models_dir):
    """engine_with(budget in tiny-model units) -> an engine serving qwen3-0.6b (loaded at start),
    qwen3-4b and qwen3-8b (loaded on demand)."""
    made = []

    async def make(budget_models: float = 0):
        mlx = MLXThread("on-demand-test")
        start = mlx.call(registry.load, registry.resolve("qwen3-0.6b"))
        policy = LoadPolicy(
            [registry.resolve("qwen3-4b"), registry.resolve("qwen3-8b")],
            budget_bytes=int(budget_models * start.nbytes),
        )
        engine = EmbedderEngine([start], mlx, policy=policy)
        await engine.start()
        made.append(engine)
        return engine

    yield make
    for e in made:
        await e.stop()
        e.mlx.shutdown()


def active_memory() -> int:
    """MLX's bytes in use once garbage (of this test or earlier ones) is collected."""
    gc.collect()
    return mx.get_active_memory()


def loaded(engine) -> list[str]:
    return sorted(m.name for m in engine.models)


class BlockedMLX:
    """Holds the engine's MLX thread until released: requests queued meanwhile stay in flight."""

    def __init__(self, engine):
        self.gate = threading.Event()
        engine.mlx.submit(self.gate.wait, 30)

    def release(self):
        self.gate.set()


async def until(condition, what: str, timeout: float = 10.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def test_estimate_matches_the_loaded_parameter_bytes(tiny_qwen3, tiny_reranker, tiny_bert):
    mlx = MLXThread("estimate-test")
    try:
        for path, kind in ((tiny_qwen3, None), (tiny_reranker, "reranker"), (tiny_bert, None)):
            r = registry.resolve(str(path), kind)
            model = mlx.call(registry.load, r)
            estimate = registry.estimate_bytes(r)
            # Exact for the Qwen3 bodies; BERT's unused pooler and the reranker's two kept head
            # rows are the only differences.
            assert model.nbytes > 0 and abs(estimate - model.nbytes) <= 0.05 * model.nbytes, (path, estimate)
            assert registry.estimate_bytes(r, "bfloat16") == pytest.approx(estimate / 2, rel=0.01)
    finally:
        mlx.shutdown()


async def test_least_recently_used_model_is_unloaded_first(engine_with):
    engine = await engine_with(budget_models=2.5)
    doc = ["the same text"]
    first = (await engine.embed(doc, model="qwen3-4b")).vectors
    assert loaded(engine) == [A, B]
    await engine.embed(doc)  # the default (A) is now more recent than B
    two_models = engine.mlx.call(active_memory)
    await engine.embed(doc, model="qwen3-8b")  # over budget: B, the least recently used, goes
    assert loaded(engine) == [A, C]
    # B's arrays really went: MLX holds about what it held with two models, not three.
    size = engine.models[0].nbytes
    assert abs(engine.mlx.call(active_memory) - two_models) < size / 2
    again = (await engine.embed(doc, model="Qwen/Qwen3-Embedding-4B")).vectors  # A is now the oldest
    assert loaded(engine) == [B, C]
    assert np.array_equal(first, again)  # a reloaded model answers as before
    r = await engine.embed(doc)  # the default model itself reloads on demand
    assert r.model == A and loaded(engine) == [A, B]
    assert engine.pool.used_bytes <= engine.pool.policy.budget_bytes


async def test_a_model_with_requests_in_flight_is_never_unloaded(engine_with):
    engine = await engine_with(budget_models=2.5)
    await engine.embed(["x"])
    await engine.embed(["x"], model="qwen3-4b")  # A is the least recently used now
    blocked = BlockedMLX(engine)
    on_a = asyncio.ensure_future(engine.embed(["held in flight"]))
    await until(lambda: engine.pool.lookup(A, None).in_flight == 1, "A's request to be in flight")
    on_c = asyncio.ensure_future(engine.embed(["y"], model="qwen3-8b"))
    b = engine.pool.lookup("qwen3-4b", None)
    await until(lambda: b.model is None, "B to be unloaded")
    assert loaded(engine) == [A]  # A (busy) stayed though older; C loads once the thread is free
    blocked.release()
    assert (await on_a).model == A and (await on_c).model == C
    assert loaded(engine) == [A, C]


async def test_a_load_waits_for_busy_models_then_fails_naming_the_budget(engine_with):
    engine = await engine_with(budget_models=1.5)
    blocked = BlockedMLX(engine)
    on_a = asyncio.ensure_future(engine.embed(["held in flight"]))
    await until(lambda: engine.pool.lookup(A, None).in_flight == 1, "A's request to be in flight")
    engine.pool.policy.wait_s = 0.3
    with pytest.raises(ResourceExhausted) as err:
        await engine.embed(["y"], model="qwen3-4b")
    assert "--model-memory-gb" in err.value.message and A in err.value.message
    # A request's own deadline ends its wait, not the load the others wait for.
    engine.pool.policy.wait_s = 30
    loop = asyncio.get_running_loop()
    on_b = asyncio.ensure_future(engine.embed(["y"], model="qwen3-4b"))
    with pytest.raises(DeadlineExceeded):
        await engine.embed(["z"], model="qwen3-4b", deadline=loop.time() + 0.2)
    assert not on_b.done() and loaded(engine) == [A]  # the load waits for A's request to finish
    blocked.release()
    assert (await on_a).model == A and (await on_b).model == B
    assert loaded(engine) == [B]


async def test_a_model_larger_than_the_whole_budget_is_refused(engine_with):
    engine = await engine_with(budget_models=1.0)
    await engine.embed(["x"])
    engine.pool.policy.budget_bytes //= 2  # the budget shrinks below one model
    with pytest.raises(FailedPrecondition) as err:  # retrying cannot help: not RESOURCE_EXHAUSTED
        await engine.embed(["x"], model="qwen3-8b")
    assert "more than the whole --model-memory-gb" in err.value.message


@pytest.mark.parametrize("damage", ["header", "weights"])
async def test_a_corrupt_checkpoint_is_failed_precondition_naming_it(engine_with, models_dir, tiny_qwen3, damage):
    """A checkpoint loaded on demand whose safetensors is cut short (a download that stopped):
    the request gets FAILED_PRECONDITION naming the model and its folder, not INTERNAL; the embedder
    serves on and a retry answers the same."""
    copy = models_dir / "qwen3-8b"
    copy.unlink()
    shutil.copytree(tiny_qwen3, copy)
    (f,) = copy.glob("*.safetensors")
    data = f.read_bytes()
    f.write_bytes(data[:5] if damage == "header" else data[: len(data) // 2])
    engine = await engine_with()
    for _ in range(2):
        with pytest.raises(FailedPrecondition) as err:
            await engine.embed(["x"], model="qwen3-8b")
        assert C in err.value.message and str(copy) in err.value.message, err.value.message
    assert (await engine.embed(["x"])).model == A and loaded(engine) == [A]
    assert engine.pool.used_bytes == engine.pool.lookup(A, None).nbytes  # nothing stays reserved


async def test_an_evicted_start_model_loads_again_at_its_exact_size(engine_with):
    """A start model unloaded for another comes back when asked for: its reload reserves the size
    it had (an estimate from the file headers can be a little larger and exceed a tight budget)."""
    engine = await engine_with(budget_models=1.0)
    start = engine.pool.start_entries[0]
    exact = start.nbytes
    engine.pool.policy.budget_bytes = exact  # exactly one model fits
    await engine.embed(["x"], model="qwen3-8b")  # evicts the start model
    assert start.model is None
    assert (await engine.embed(["x"])).model == start.name
    assert start.nbytes == exact


async def test_requests_during_a_load_wait_for_it_and_all_succeed(engine_with, caplog):
    engine = await engine_with(budget_models=2.5)
    caplog.set_level(logging.INFO, logger="extmind.embedder.pool")
    texts = [[f"text {i}"] for i in range(8)]
    calls = [engine.embed(t, model="qwen3-8b") for t in texts]
    calls.append(engine.tokenize(["hello"], model="qwen3-8b"))
    # One caller giving up while the load runs does not stop it for the others.
    impatient = asyncio.ensure_future(asyncio.wait_for(engine.embed(["gone"], model="qwen3-8b"), 0.001))
    results = await asyncio.gather(*calls)
    with pytest.raises(TimeoutError):
        await impatient
    assert all(r.model == C for r in results[:-1]) and results[-1][0] == C
    loads = [r for r in caplog.records if r.getMessage() == "model loaded on demand"]
    assert len(loads) == 1, [r.getMessage() for r in caplog.records]
    alone = (await engine.embed(texts[3], model="qwen3-8b")).vectors
    assert np.allclose(results[3].vectors, alone, atol=1e-6)


def test_refusals_say_what_to_change(models_dir):
    from services.embedder.pool import ModelPool

    mlx = MLXThread("refusal-test")
    try:
        start = mlx.call(registry.load, registry.resolve("qwen3-0.6b"))
        found, missing = registry.loadable(["qwen3-4b", "qwen3-reranker-8b"], [registry.resolve("qwen3-0.6b")])
        assert [r.name for r in found] == [B]
        pool = ModelPool([start], mlx, LoadPolicy(found, missing))
        with pytest.raises(NotFound) as err:  # known, not allowed
            pool.lookup("qwen3-8b", None)
        assert "--allow-load qwen3-8b" in err.value.message and "loaded on demand" in err.value.message
        with pytest.raises(NotFound) as err:  # allowed, not on this machine: where it was looked for
            pool.lookup("Qwen3-Reranker-8B", "reranker")
        assert "not on this machine" in err.value.message and str(models_dir / "qwen3-reranker-8b") in err.value.message
        with pytest.raises(NotFound) as err:  # unknown altogether
            pool.lookup("no-such-model", None)
        assert "not served here" in err.value.message and "--allow-load" not in err.value.message
        with pytest.raises(ResourceExhausted) as err:
            ModelPool([start], mlx, LoadPolicy(budget_bytes=start.nbytes // 2))
        assert "--model-memory-gb" in err.value.message
    finally:
        mlx.shutdown()


async def test_load_on_demand_over_grpc_and_http(start_app, models_dir, tiny_bert, tiny_qwen3):
    app = await start_app(
        "--model",
        str(tiny_bert),
        "--allow-load",
        "qwen3-8b",
        "--allow-load",
        "qwen3-reranker-4b",
        "--allow-load",
        "qwen3-4b",
        env={"EMBEDDER_MODEL_MEMORY_GB": "1"},
    )
    port = app.http.port
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as ch:
        stub = embedder_pb2_grpc.EmbedderServiceStub(ch)
        info = await stub.GetInfo(pb.EmbedderServiceGetInfoRequest())
        assert [m.name for m in info.models] == ["bert-tiny"] and info.models[0].memory_bytes > 0
        assert info.model_memory_budget_bytes == 10**9
        assert [(m.name, list(m.aliases), m.kind, m.dimensions) for m in info.available_models] == [
            (C, ["qwen3-8b"], pb.MODEL_KIND_EMBEDDING, 0),
            ("Qwen/Qwen3-Reranker-4B", ["qwen3-reranker-4b"], pb.MODEL_KIND_RERANKER, 0),
            (B, ["qwen3-4b"], pb.MODEL_KIND_EMBEDDING, 0),
        ]
        status, listed = await call(port, "GET", "/v1/models")
        assert status == 200
        assert [(m["id"], m["loaded"]) for m in listed["data"]] == [
            ("bert-tiny", True),
            (C, False),
            ("Qwen/Qwen3-Reranker-4B", False),
            (B, False),
        ]

        r = await stub.Embed(pb.EmbedRequest(inputs=["hello", "world"], model="qwen3-8b"))
        assert r.model == C and r.dimensions == 64
        ranked = await stub.Rerank(pb.RerankRequest(query="q", documents=["a", "b"], model="qwen3-reranker-4b"))
        assert ranked.model == "Qwen/Qwen3-Reranker-4B" and len(ranked.results) == 2
        status, body = await call(port, "POST", "/v1/embeddings", {"input": "hi", "model": "qwen3-4b"})
        assert status == 200 and body["model"] == B

        info = await stub.GetInfo(pb.EmbedderServiceGetInfoRequest())
        assert [m.name for m in info.models] == ["bert-tiny", C, "Qwen/Qwen3-Reranker-4B", B]
        assert all(m.memory_bytes > 0 for m in info.models) and not info.available_models
        assert info.models[1].dimensions == 64 and list(info.models[1].aliases) == ["qwen3-8b"]
        status, listed = await call(port, "GET", "/v1/models")
        assert all(m["loaded"] for m in listed["data"]) and len(listed["data"]) == 4

        with pytest.raises(grpc.aio.AioRpcError) as err:  # known but not allowed
            await stub.Embed(pb.EmbedRequest(inputs=["x"], model="qwen3-0.6b"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "--allow-load qwen3-0.6b" in err.value.details()
        status, body = await call(port, "POST", "/v1/embeddings", {"input": "hi", "model": "qwen3-0.6b"})
        assert status == 404 and body["error"]["code"] == "model_not_found"
        assert "--allow-load" in body["error"]["message"]


async def test_budget_unloads_over_grpc_and_the_default_is_unchanged(start_app, models_dir, tiny_qwen3):
    one = registry.estimate_bytes(registry.resolve(str(tiny_qwen3)))
    app = await start_app(
        "--model",
        "qwen3-0.6b",
        "--allow-load",
        "*",
        "--model-memory-gb",
        str(1.5 * one / 1e9),
    )
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as ch:
        stub = embedder_pb2_grpc.EmbedderServiceStub(ch)
        info = await stub.GetInfo(pb.EmbedderServiceGetInfoRequest())
        available = {m.name for m in info.available_models}
        assert {B, C, "Qwen/Qwen3-Reranker-4B"} <= available and A not in available
        await stub.Embed(pb.EmbedRequest(inputs=["x"], model="qwen3-4b"))
        info = await stub.GetInfo(pb.EmbedderServiceGetInfoRequest())
        assert [m.name for m in info.models] == [B]  # A went: two do not fit
        assert A in {m.name for m in info.available_models} and info.default_model == A
        r = await stub.Embed(pb.EmbedRequest(inputs=["x"]))  # the default comes back
        assert r.model == A
        with pytest.raises(grpc.aio.AioRpcError) as err:  # allowed by '*' but absent
            await stub.Embed(pb.EmbedRequest(inputs=["x"], model="qwen3-reranker-8b"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND and "not on this machine" in err.value.details()


def test_default_allows_nothing_more_and_sets_no_budget():
    from services.embedder.app import parse_args

    a = parse_args([])
    assert a.allow_load == [] and a.model_memory_gb == 0
    with pytest.raises(SystemExit):
        parse_args(["--model-memory-gb", "-1"])
