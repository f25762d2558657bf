"""Every tested mlx-lm model type (dense and mixture-of-experts), 4-bit and 8-bit, quantized by
mlx-lm's own tools (group size 64, as in the mlx-community repos) and loaded through the same path
as a downloaded model: stock tokens without memories, the numpy model (run on the dequantized
weights, MoE routing included) with memories, LOCAL == REMOTE, and a 7 000-token Memorize."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import convert
from mlx_lm.generate import generate_step
from mlx_lm.utils import load

from extmind.tiny_moe_models import DECODER_BUILDERS
from services.generator.attention_parts import TESTED_MODEL_TYPES
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.memory_builder import plan_windows
from services.generator.memory_client import MemoryClient
from services.generator.request_types import STOP, GenerationRequest, MemoryOptions, Sampling

from .helpers import PROMPTS, QUANTIZED_SIZES, events, run
from .memory_helpers import LOGIT_MARGIN, TEXT, ref_memory
from .np_reference import Model, dequantized_weights

ARCHS = ["llama", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral"]
# float32 vs float64 router logits differ by ~1e-6: a route is compared only where the reference's
# k-th expert beats the next one by far more than that.
ROUTE_MARGIN = 1e-4
SEEDS = {"llama": 11, "qwen2": 12, "qwen3": 13, "qwen3_moe": 14, "qwen2_moe": 15, "mixtral": 16}


@pytest.fixture(scope="module", params=[(a, b) for a in ARCHS for b in (4, 8)], ids=lambda p: f"{p[0]}-{p[1]}bit")
def checkpoint(request, tmp_path_factory):
    arch, bits = request.param
    d = tmp_path_factory.mktemp(f"{arch}-{bits}")
    src = DECODER_BUILDERS[arch](d / "float", seed=SEEDS[arch], **QUANTIZED_SIZES[arch])
    out = d / f"{arch}-{bits}bit"
    convert(hf_path=str(src), mlx_path=str(out), quantize=True, q_bits=bits, q_group_size=64)
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization"]  # (Qwen3-MoE's routers get mlx-lm's own 8-bit override, as in the real repos)
    assert cfg["model_type"] == arch and (q["group_size"], q["bits"], q.get("mode", "affine")) == (64, bits, "affine")
    return arch, out


@pytest.fixture(scope="module")
def engine(checkpoint, module_memory_service):
    e = GeneratorEngine(EngineConfig(model=str(checkpoint[1]), memory_url=module_memory_service.address))
    e.start()
    yield e
    e.stop()


@pytest.fixture(scope="module")
def ref(checkpoint):
    weights, cfg = dequantized_weights(checkpoint[1])
    return Model(weights=weights, config=cfg)


@pytest.fixture(scope="module")
def memory(engine):
    tokens = engine.tokenizer.encode(TEXT)
    return engine.memorize_blocking(tokens)["memory_id"], tokens


def test_every_architecture_is_in_the_table():
    assert set(ARCHS) <= set(TESTED_MODEL_TYPES)


def test_shapes_come_from_the_config(engine, checkpoint):
    cfg = json.loads((checkpoint[1] / "config.json").read_text())
    assert (engine.num_layers, engine.num_heads, engine.num_kv_heads, engine.head_dim) == (
        cfg["num_hidden_layers"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
    )
    packed = engine.model.layers[0].self_attn.inner.k_proj.weight
    assert packed.dtype == mx.uint32  # really packed: the shapes cannot come from it


async def test_no_memory_gives_the_stock_tokens(engine, checkpoint):
    model, tok = load(str(checkpoint[1]))
    for text in PROMPTS[:3]:
        prompt = engine.tokenizer.encode(text)
        stock = []
        for t, _ in generate_step(mx.array(prompt), model, max_tokens=8):
            if t in tok.eos_token_ids:
                break
            stock.append(int(t))
        got, _, _, _ = await run(engine, GenerationRequest(prompt, Sampling(max_tokens=8)))
        assert got == stock


def _decidable_reference(engine, ref, **kw):
    """The first prompt whose reference greedy run makes at least 3 tokens before an end token, with
    every logit gap above LOGIT_MARGIN and every expert choice above ROUTE_MARGIN up to there: its
    tokens and logprobs (cut after an end token, where the engine stops)."""
    for text in PROMPTS:
        prompt = engine.tokenizer.encode(text)
        margins = []
        for m in ref.moes:
            m.gaps.clear()
        want, want_lp = ref.greedy(prompt, 6, margins=margins, **kw)
        n = next((i + 1 for i, t in enumerate(want) if t in engine.eos_ids), len(want))
        gaps = ref.route_gaps()  # (the steps after an end token route too: a stricter check)
        if n >= 3 and min(margins[:n]) > LOGIT_MARGIN and (not gaps or min(gaps) > ROUTE_MARGIN):
            return prompt, want[:n], want_lp[:n]
    raise AssertionError("no prompt gave the reference decidable logits and routes")


async def test_memories_match_the_numpy_model_on_dequantized_weights(engine, memory, ref, module_memory_service):
    mid, tokens = memory
    bank, _ = ref_memory(ref, tokens, engine.special_ids)
    client = MemoryClient(module_memory_service.address)
    try:  # the stored rows are the raw keys (after k_norm for Qwen3) and the values
        keys, values = client.fetch(mid, engine.num_layers)
    finally:
        client.close()
    for layer, (k, v) in enumerate(bank):
        np.testing.assert_allclose(keys[layer], k, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(values[layer], v, rtol=1e-4, atol=1e-4)
    prompt, want, want_lp = _decidable_reference(engine, ref, memory=bank, top_k=3)
    got, got_lp, _, _ = await run(
        engine,
        GenerationRequest(prompt, Sampling(max_tokens=6), MemoryOptions((mid,), top_k=3), return_logprobs=True),
    )
    assert got == [t for t in want if t not in engine.eos_ids]  # the end token itself is not streamed
    np.testing.assert_allclose(got_lp, want_lp[: len(got)], atol=1e-3)
    # The memories change the output: the first step's five most likely tokens or their logprobs
    # (the chosen token's alone can be ~0 either way in a confident model).
    first = {}
    for name, memory in (("with", MemoryOptions((mid,), top_k=3)), ("without", None)):
        req = GenerationRequest(prompt, Sampling(max_tokens=1), memory, return_logprobs=True, top_logprobs=5)
        chunks, final = await events(engine, req)
        first[name] = dict(chunks[0].top_logprobs[0]) if chunks else {}
        assert chunks or (name, final.finish_reason, final.completion_tokens) == ("without", STOP, 1)
    with_m, without = first["with"], first["without"]  # (without: {} if its first token is the end)
    assert with_m and (not without or moved(with_m, without) or moved(without, with_m))


def moved(a: dict, b: dict) -> bool:
    """Whether a token of top list ``a`` has a logprob more than LOGIT_MARGIN from its own in top
    list ``b``, or, where ``b`` lacks it, above ``b``'s last by more (a near tie at the fifth place
    that float noise flips is no change)."""
    return any(abs(lp - b[t]) > LOGIT_MARGIN if t in b else lp > min(b.values()) + LOGIT_MARGIN for t, lp in a.items())


async def test_local_equals_remote(engine, memory):
    mid, _ = memory
    prompt = engine.tokenizer.encode("Alice met Bob at")
    out = {}
    for mode in ("local", "remote"):
        out[mode] = await run(
            engine,
            GenerationRequest(
                prompt, Sampling(max_tokens=8), MemoryOptions((mid,), top_k=4, mode=mode), return_logprobs=True
            ),
        )
    assert out["local"][0] == out["remote"][0]
    np.testing.assert_allclose(out["local"][1], out["remote"][1], atol=1e-4)


@pytest.mark.slow
def test_memorize_a_7000_token_text(engine, ref, module_memory_service):
    """Nine overlapping windows; the rows of the last one are the reference's raw keys and values
    over that window's tokens (positions restarting at 0)."""
    pieces = [t for t in engine.tokenizer.encode(TEXT * 200) if t not in engine.special_ids]
    tokens = pieces[:7000]
    assert len(tokens) == 7000
    out = engine.memorize_blocking(tokens)
    assert out["num_tokens"] == out["num_rows"] == 7000
    last = plan_windows(7000, engine.config.window, engine.config.stride)[-1]
    cap = []
    ref.forward(tokens[last.start : last.end], capture=cap)
    client = MemoryClient(module_memory_service.address)
    try:
        keys, values = client.fetch(out["memory_id"], engine.num_layers)
    finally:
        client.close()
    new = slice(last.first_new - last.start, None)
    for layer, (k, v) in enumerate(cap):
        assert keys[layer].shape == (engine.num_kv_heads, 7000, engine.head_dim)
        np.testing.assert_allclose(keys[layer][:, last.first_new :], k[:, new], rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(values[layer][:, last.first_new :], v[:, new], rtol=1e-3, atol=1e-3)
