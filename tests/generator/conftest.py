"""Tiny random checkpoints shared by the generator tests (built once per session)."""

from __future__ import annotations

import contextlib

import pytest

from extmind import errors
from extmind.tiny_models import build_llama, build_qwen3
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.memory_client import MemoryClient

from .memory_helpers import SHORT_TEXT, TEXT
from .np_reference import Model


@pytest.fixture(scope="session")
def llama_path(tmp_path_factory):
    # llama3 RoPE scaling, GQA (4 query heads over 2 KV heads), untied head.
    return build_llama(
        tmp_path_factory.mktemp("llama"), hidden=64, layers=2, heads=4, kv_heads=2, rope_scaling="llama3", seed=1
    )


@pytest.fixture(scope="session")
def qwen3_path(tmp_path_factory):
    return build_qwen3(tmp_path_factory.mktemp("qwen3"), hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, seed=2)


@pytest.fixture(params=["llama", "qwen3"])
def model_path(request, llama_path, qwen3_path):
    return llama_path if request.param == "llama" else qwen3_path


# ---- a generator engine on a real memory service, with the text memorized (the memory tests)


@pytest.fixture(scope="module")
def memory_address(module_memory_service):
    return module_memory_service.address


@pytest.fixture(scope="module")
def plain_engine(llama_path):
    """The tiny Llama's engine without a memory service."""
    e = GeneratorEngine(EngineConfig(model=str(llama_path)))
    e.start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def engine(llama_path, memory_address):
    # The attention mass on every step: the tests compare it with the numpy model's, step by step
    # (test_attention_mass_sampling.py measures the sampled default).
    e = GeneratorEngine(
        EngineConfig(model=str(llama_path), memory_url=memory_address, window=3072, stride=512, attention_mass_every=1)
    )
    e.start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def memory(engine):
    tokens = engine.tokenizer.encode(TEXT)
    out = engine.memorize_blocking(tokens, labels={"kind": "test"})
    return out["memory_id"], tokens


@pytest.fixture(scope="module")
def client(memory_address):
    c = MemoryClient(memory_address)
    yield c
    c.close()


@pytest.fixture(scope="module")
def ref(llama_path):
    return Model(llama_path)


@pytest.fixture
def fresh(engine, client):
    """A factory of memories under new ids (``make(memory_id, text=SHORT_TEXT)`` memorizes the
    text with the module's engine), deleted after the test."""
    made = []

    def make(mid: str, text: str = SHORT_TEXT) -> str:
        engine.memorize_blocking(engine.tokenizer.encode(text), memory_id=mid)
        made.append(mid)
        return mid

    yield make
    for mid in made:
        with contextlib.suppress(errors.NotFound):
            client.delete_memory(mid)
