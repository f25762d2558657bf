"""Model resolution: aliases through their variables, MLX_MODELS_DIR, the package default, and
one NotFound naming every place tried; several models from one process."""

from __future__ import annotations

import grpc
import pytest

from extmind.errors import NotFound
from extmind.v1 import embedder_pb2 as pb
from extmind.v1 import embedder_pb2_grpc
from services.embedder import registry


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in ("MLX_MODEL_QWEN3_0_6B_PATH", "MLX_MODEL_QWEN3_4B_PATH", "MLX_MODEL_QWEN3_8B_PATH", "MLX_MODELS_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_alias_through_its_variable(tiny_qwen3, monkeypatch):
    monkeypatch.setenv("MLX_MODEL_QWEN3_4B_PATH", str(tiny_qwen3))
    r = registry.resolve("qwen3-4b")
    assert (r.path, r.name, r.kind, r.aliases) == (tiny_qwen3, "Qwen/Qwen3-Embedding-4B", "embedding", ["qwen3-4b"])
    assert registry.resolve("Qwen/Qwen3-Embedding-4B").path == tiny_qwen3  # the hub id finds the local copy


def test_alias_through_models_dir(tiny_qwen3, tmp_path, monkeypatch):
    (tmp_path / "Qwen3-Embedding-8B").symlink_to(tiny_qwen3, target_is_directory=True)
    monkeypatch.setenv("MLX_MODELS_DIR", str(tmp_path))
    r = registry.resolve("qwen3-8b")
    assert r.path == tmp_path / "Qwen3-Embedding-8B" and r.name == "Qwen/Qwen3-Embedding-8B"


def test_names_under_models_dir_and_directories(models_root, tiny_qwen3, tiny_reranker, monkeypatch):
    monkeypatch.setenv("MLX_MODELS_DIR", str(models_root))
    r = registry.resolve("Qwen3-Embedding-tiny")
    assert r.path == models_root / "Qwen3-Embedding-tiny" and r.name == "Qwen3-Embedding-tiny"
    assert registry.resolve(str(tiny_reranker)).kind == "reranker"  # by name
    assert registry.resolve(str(tiny_qwen3), "reranker").kind == "reranker"  # by --reranker


def test_default_is_the_packaged_minilm(minilm_path):
    r = registry.resolve("all-minilm-l6-v2")
    assert r.path == minilm_path and r.name == "sentence-transformers/all-MiniLM-L6-v2"


def test_not_found_names_every_place_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_MODEL_QWEN3_0_6B_PATH", str(tmp_path / "missing"))
    monkeypatch.setenv("MLX_MODELS_DIR", str(tmp_path))
    with pytest.raises(NotFound) as err:
        registry.resolve("qwen3-0.6b")
    msg = err.value.message
    for place in (
        "MLX_MODEL_QWEN3_0_6B_PATH",
        str(tmp_path / "missing"),
        str(tmp_path / "Qwen3-Embedding-0.6B"),
        "hub Qwen/Qwen3-Embedding-0.6B",
        "HF_HUB_OFFLINE",
    ):
        assert place in msg, (place, msg)
    with pytest.raises(NotFound) as err:
        registry.resolve(str(tmp_path / "nope"))
    assert str(tmp_path / "nope") in err.value.message


async def test_unknown_model_fails_start_up_clearly(start_app, tmp_path):
    with pytest.raises(NotFound) as err:
        await start_app("--model", str(tmp_path / "no-such-model"))
    assert "no-such-model" in err.value.message


async def test_several_models_from_one_process(start_app, tiny_qwen3, tiny_bert, minilm_path, monkeypatch):
    monkeypatch.setenv("MLX_MODEL_QWEN3_0_6B_PATH", str(tiny_qwen3))
    app = await start_app("--model", "qwen3-0.6b", "--model", str(tiny_bert), "--model", "minilm")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as ch:
        stub = embedder_pb2_grpc.EmbedderServiceStub(ch)
        info = await stub.GetInfo(pb.EmbedderServiceGetInfoRequest())
        assert info.default_model == "Qwen/Qwen3-Embedding-0.6B"
        assert [m.name for m in info.models] == [
            "Qwen/Qwen3-Embedding-0.6B",
            "bert-tiny",
            "sentence-transformers/all-MiniLM-L6-v2",
        ]
        for name, dims in (("qwen3-0.6b", 64), ("bert-tiny", 64), ("all-minilm-l6-v2", 384), ("", 64)):
            r = await stub.Embed(pb.EmbedRequest(inputs=["hello"], model=name))
            assert r.dimensions == dims, name


async def test_tokenize_finds_models_like_every_other_rpc(start_app, tiny_qwen3, tiny_reranker, tmp_path, monkeypatch):
    """A reranker served as ``org/name`` is found by its last part for Tokenize as for Rerank."""
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "Qwen3-Reranker-tiny").symlink_to(tiny_reranker, target_is_directory=True)
    monkeypatch.setenv("MLX_MODELS_DIR", str(tmp_path))
    app = await start_app("--model", str(tiny_qwen3), "--reranker", "org/Qwen3-Reranker-tiny")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.server.port}") as ch:
        stub = embedder_pb2_grpc.EmbedderServiceStub(ch)
        ranked = await stub.Rerank(pb.RerankRequest(query="q", documents=["a", "b"], model="Qwen3-Reranker-tiny"))
        assert ranked.model == "org/Qwen3-Reranker-tiny"
        for name in ("Qwen3-Reranker-tiny", "org/Qwen3-Reranker-tiny", "QWEN3-RERANKER-TINY"):
            t = await stub.Tokenize(pb.TokenizeRequest(inputs=["hello world"], model=name))
            assert t.model == "org/Qwen3-Reranker-tiny" and len(t.results[0].token_ids) > 0, name
        t = await stub.Tokenize(pb.TokenizeRequest(inputs=["hello world"]))
        assert t.model == "Qwen3-Embedding-tiny"  # no name: the default embedder
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Tokenize(pb.TokenizeRequest(inputs=["x"], model="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_no_model_configured_serves_minilm(start_app, monkeypatch):
    monkeypatch.delenv("EMBEDDER_MODEL", raising=False)
    monkeypatch.delenv("EMBEDDER_MODELS", raising=False)
    app = await start_app()
    assert [m.name for m in app.engine.models] == ["sentence-transformers/all-MiniLM-L6-v2"]


def test_flags_read_their_variables(monkeypatch):
    from services.embedder.app import parse_args

    monkeypatch.setenv("EMBEDDER_MODEL", "qwen3-0.6b,qwen3-4b")
    monkeypatch.setenv("EMBEDDER_HTTP_PORT", "8123")
    monkeypatch.setenv("EMBEDDER_MAX_QUEUE", "99")
    monkeypatch.setenv("EMBEDDER_PORT", "50999")
    a = parse_args([])
    assert (a.model, a.http_port, a.max_queue, a.port) == (["qwen3-0.6b", "qwen3-4b"], 8123, 99, 50999)
    assert parse_args(["--model", "x", "--http-port", "1"]).model == ["x"]
