"""One extended-mind attention layer (MLX) against the independent numpy layer, both formulations."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import load

from services.generator.bank_cache import LocalRetriever, bank_from_numpy
from services.generator.extended_attention import MemoryContext, install

from .np_reference import Layer, Retrievals, rope_inv_freq

TOL = dict(rtol=1e-5, atol=1e-5)


def _setup(path, layer=1):
    model, _ = load(str(path))
    state = install(model)
    cfg = json.loads((path / "config.json").read_text())
    attn = model.layers[layer].self_attn
    weights = {k: np.array(v) for k, v in tree_flatten(attn.inner.parameters())}
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    ref = Layer(
        weights,
        n_heads=cfg["num_attention_heads"],
        n_kv_heads=cfg["num_key_value_heads"],
        head_dim=d,
        inv_freq=rope_inv_freq(d, cfg["rope_theta"], cfg.get("rope_scaling")),
        eps=cfg["rms_norm_eps"],
    )
    return model, state, attn, ref, cfg


def _bank(cfg, n, seed=0, layer=1):
    rng = np.random.default_rng(seed)
    kvh = cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    keys = [rng.standard_normal((kvh, n, d)).astype(np.float32) for _ in range(cfg["num_hidden_layers"])]
    values = [rng.standard_normal((kvh, n, d)).astype(np.float32) for _ in range(cfg["num_hidden_layers"])]
    return keys, values


def _run_chunks(attn, x, chunks, batch=1):
    """Feeds x [B, T, hidden] through the layer in chunks with an mlx-lm KVCache; returns the
    concatenated outputs [B, T, hidden]."""
    cache = KVCache()
    outs, start = [], 0
    for n in chunks:
        h = mx.array(x[:, start : start + n])
        out = attn(h, create_attention_mask(h, cache), cache)
        outs.append(np.array(out))
        start += n
    return np.concatenate(outs, axis=1)


def _inputs_with_margin(ref, cfg, T, keys, values, **kw):
    """Two random sequences [2, T, hidden] (float32) and the reference's outputs for them, drawn so
    that no memory row lies within the tie slack (1e-4) of a top-k boundary or the threshold: the
    retrieved sets then cannot depend on float32 rounding or the BLAS. Seeds are tried in order."""
    for seed in range(7, 40):
        x = np.random.default_rng(seed).standard_normal((2, T, cfg["hidden_size"])).astype(np.float32)
        want, ambiguous = [], 0
        for b in range(2):
            retrievals = Retrievals()
            want.append(ref.forward(x[b].astype(np.float64), keys, values, hits=retrievals, **kw))
            ambiguous += retrievals.ambiguous
        if ambiguous == 0:
            return x, want
    raise AssertionError("no seed gave inputs with a margin at the top-k boundary")


@pytest.mark.parametrize("form", ["gather", "block"])
@pytest.mark.parametrize(
    "top_k,threshold,chunks",
    [
        (3, None, [9]),  # prefill, top_k < rows
        (3, None, [5, 3, 1, 1]),  # chunked prefill (offset > 0) then decode steps (L = 1)
        (40, None, [6, 1, 1]),  # top_k > rows: every row
        (4, 0.05, [7, 2, 1]),  # threshold masks low-cosine hits
    ],
)
def test_layer_matches_numpy(model_path, form, top_k, threshold, chunks):
    model, state, attn, ref, cfg = _setup(model_path)
    keys, values = _bank(cfg, 25)
    state.memory = MemoryContext(
        LocalRetriever([bank_from_numpy("m", "1", keys, values)]), top_k=top_k, threshold=threshold
    )
    T = sum(chunks)
    x, want = _inputs_with_margin(ref, cfg, T, keys[1], values[1], top_k=top_k, threshold=threshold, form=form)
    got = _run_chunks(attn, x, chunks)
    assert attn.n_heads // attn.n_kv_heads == 2  # GQA
    for b in range(2):
        np.testing.assert_allclose(got[b], want[b], **TOL)


def test_no_memory_is_the_stock_module(model_path):
    model, state, attn, ref, cfg = _setup(model_path)
    x = mx.array(np.random.default_rng(3).standard_normal((1, 6, cfg["hidden_size"])).astype(np.float32))
    stock = attn.inner(x, "causal", None)
    keys, values = _bank(cfg, 10)
    for ctx in (
        None,
        MemoryContext(LocalRetriever([bank_from_numpy("m", "1", keys, values)]), top_k=0),
        MemoryContext(LocalRetriever([bank_from_numpy("m", "1", keys, values)]), layers=frozenset({0})),
    ):
        state.memory = ctx
        assert mx.array_equal(attn(x, "causal", None), stock).item()
    # And the numpy layer without memories agrees with stock mlx-lm (checks the reference itself).
    np.testing.assert_allclose(np.array(stock)[0], ref.forward(np.array(x)[0].astype(np.float64)), **TOL)


def test_threshold_above_every_cosine_equals_no_memory(model_path):
    model, state, attn, ref, cfg = _setup(model_path)
    x = mx.array(np.random.default_rng(4).standard_normal((1, 6, cfg["hidden_size"])).astype(np.float32))
    keys, values = _bank(cfg, 10)
    stock = np.array(attn.inner(x, "causal", None))
    state.memory = MemoryContext(LocalRetriever([bank_from_numpy("m", "1", keys, values)]), top_k=5, threshold=1.0)
    np.testing.assert_allclose(np.array(attn(x, "causal", None)), stock, rtol=1e-6, atol=1e-6)


def test_parallel_key_is_retrieved_first(model_path):
    model, state, attn, ref, cfg = _setup(model_path)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, cfg["hidden_size"])).astype(np.float32)
    keys, values = _bank(cfg, 30)
    # Row 17 of every KV head is parallel (x 3) to query head 2*g's rotated query of the last token.
    from .np_reference import rope

    q, _, _ = ref.qkv(x.astype(np.float64))
    q = rope(q, np.arange(6), ref.inv_freq)
    rep = ref.h // ref.kvh
    for g in range(ref.kvh):
        keys[1][g, 17] = 3.0 * q[g * rep, -1]
    record = []
    state.memory = MemoryContext(LocalRetriever([bank_from_numpy("m", "1", keys, values)]), top_k=1, record=record)
    attn(mx.array(x[None]), "causal", None)
    ((layer, idx),) = record
    idx = np.array(idx.rows)  # [B, H, L, k]
    assert layer == 1
    for g in range(ref.kvh):
        assert idx[0, g * rep, -1, 0] == 17
