"""The fused CUDA kernels of extended attention (services/generator/fused_attention.py) against an
exact float64 numpy top-k and against the portable MLX path on the same layer.

The kernels exist on MLX's CUDA backend only: their tests run there (tests/generator on the GPU
machine, docs/platform.md); on other backends the one test below checks that the portable path is
the one installed. Every other extended-attention test (test_attention.py against the numpy
reference, citations, memories) also runs through the kernels on CUDA, since ``install`` turns
them on there.
"""

from __future__ import annotations

import functools
import logging
import weakref

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.utils import load

from extmind.tiny_models import build_llama
from services.generator import fused_attention, prefill_attention
from services.generator.bank_cache import LocalRetriever, bank_from_numpy
from services.generator.engine import EngineConfig, GeneratorEngine
from services.generator.extended_attention import MemoryContext, install

from .np_reference import attend_over_picks

CUDA = fused_attention.enabled("auto")
needs_cuda = pytest.mark.skipif(not CUDA, reason="the fused kernels run on MLX's CUDA backend only")
SLACK = 1e-5  # cosines this close to the k-th best may be swapped by float32 rounding


def test_the_portable_path_is_installed_off_cuda(tmp_path):
    build_llama(tmp_path, seed=3)
    model, _ = load(str(tmp_path))
    assert install(model).fused is CUDA
    assert fused_attention.enabled("off") is False


@pytest.mark.parametrize("mode", ["on", "OFF", " off", ""])
def test_an_unknown_mode_is_refused_not_taken_for_auto(tmp_path, mode):
    """The flag checks its choices; an engine configured in code gets the same answer from
    ``install`` instead of the fused kernels on CUDA for a mode that meant "off"."""
    with pytest.raises(ValueError, match="use one of auto, off"):
        fused_attention.enabled(mode)
    build_llama(tmp_path, seed=3)
    model, _ = load(str(tmp_path))
    with pytest.raises(ValueError, match="fused attention mode"):
        install(model, fused=mode)


def test_the_engine_logs_which_attention_path_it_installed(llama_path, caplog):
    """--fused-attention auto picks the path by itself (the kernels on CUDA, silently the portable
    path elsewhere): the start's "model loaded" line says which one runs."""
    caplog.set_level(logging.INFO, logger="extmind.generator")
    for mode, fused in (("auto", CUDA), ("off", False)):
        caplog.clear()
        engine = GeneratorEngine(EngineConfig(model=str(llama_path), fused_attention=mode))
        engine.start()
        try:
            loaded = [r for r in caplog.records if r.getMessage() == "model loaded"]
            assert len(loaded) == 1 and loaded[0].fused_attention is fused
            assert engine.state.fused is fused
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
        finally:
            engine.stop()


def _np_cosines(q, keys):
    """q [B, H, L, d], keys [KVH, N, d] -> cosines [B, H, L, N] and raw dots (float64)."""
    H, kvh = q.shape[1], keys.shape[0]
    kg = np.repeat(keys, H // kvh, axis=0)  # [H, N, d]
    dots = np.einsum("bhld,hnd->bhln", q, kg)
    qn = np.sqrt(np.maximum((q * q).sum(-1, keepdims=True), 1e-24))
    kn = np.sqrt(np.maximum((kg * kg).sum(-1), 1e-24))[None, :, None, :]
    return dots / qn / kn, dots


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize(
    "n,top_k,d,threshold,L,one_chunk",
    [
        (5, 10, 16, None, 3, False),  # top_k > rows
        (25, 3, 16, None, 3, False),
        (1000, 10, 64, None, 3, False),  # each tile's scan split over chunks, then merged
        (1000, 10, 64, None, 3, True),  # one warp scans a tile's whole bank
        (5000, 32, 80, None, 3, False),
        (700, 8, 64, 0.1, 3, True),
        (3000, 8, 64, 0.1, 3, False),  # chunks and a threshold
        (1000, 10, 64, 0.1, 130, False),  # a prefill-sized batch: the cosines from one matmul
    ],
)
def test_top_k_rows_is_the_exact_cosine_top_k(dtype, n, top_k, d, threshold, L, one_chunk, monkeypatch):
    if one_chunk:
        monkeypatch.setattr(fused_attention, "_FILL_WARPS", 1)
        # A fresh memo of the scan's launches, which chunks_for (reading _FILL_WARPS) made.
        fresh = functools.lru_cache(maxsize=None)(fused_attention._scan_call.__wrapped__)
        monkeypatch.setattr(fused_attention, "_scan_call", fresh)
    rng = np.random.default_rng(n + d)
    B, H, KVH = 2, 8, 2
    keys = rng.standard_normal((KVH, n, d)).astype(np.float32)
    q = rng.standard_normal((B, H, L, d)).astype(np.float32)
    keys_mx = mx.array(keys).astype(dtype)
    keys = np.array(keys_mx.astype(mx.float32)).astype(np.float64)  # what the kernel sees
    inv = mx.rsqrt(mx.maximum(mx.sum(keys_mx.astype(mx.float32) ** 2, axis=-1), 1e-24))
    rows, dots = fused_attention.top_k_rows(mx.array(q), mx.contiguous(keys_mx.swapaxes(-1, -2)), inv, top_k, threshold)
    rows, dots = np.array(rows), np.array(dots)
    k = min(top_k, n)
    tiles = B * H * L // fused_attention.head_tile(H, KVH, fused_attention.list_size(min(top_k, n)))
    assert (fused_attention.chunks_for(tiles, n, min(top_k, n)) > 1) == (
        n >= 256 and not one_chunk
    )  # both kernels' paths run
    assert rows.shape == dots.shape == (B, H, L, k) and rows.dtype == np.int32
    cos, raw = _np_cosines(q.astype(np.float64), keys)
    kth = -np.sort(-cos, axis=-1)[..., k - 1]
    checked = 0
    for idx in np.ndindex(B, H, L):
        got = rows[idx]
        if threshold is None:
            picked = got
            assert (picked >= 0).all()
        else:
            # A row is reported (not -1) exactly when its cosine is above the threshold; rows
            # within the slack of the threshold may go either way.
            cand = -np.sort(-cos[idx])[:k]
            above = cand > threshold + SLACK
            below = cand <= threshold - SLACK
            assert (got >= 0).sum() >= above.sum() and (got < 0).sum() >= below.sum()
            picked = got[got >= 0]
        assert len(set(picked.tolist())) == len(picked)
        # Tie-aware: every picked row is within the slack of the k-th best cosine.
        assert (cos[idx][picked] >= kth[idx] - SLACK).all()
        sel = got >= 0
        np.testing.assert_allclose(dots[idx][sel], raw[idx][got[sel]], rtol=1e-4, atol=1e-4)
        checked += 1
    assert checked == B * H * L


@needs_cuda
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32])
def test_prefill_top_k_is_exact_where_float16_cannot_tell_rows_apart(dtype):
    """prefill_top_k ranks float16 banks by approximate cosines (a float16 matmul) and re-ranks
    candidates exactly. Here 120 rows sit within ~1e-3 of each other around every query's
    direction (the float16 scores cannot order them), two rows have norms whose float16 scores
    overflow (one parallel to the queries: the true top-1; one anti-parallel), the rest is noise:
    the picks must still be the exact float32 top-k (tie-aware within SLACK) with exact raw dots."""
    rng = np.random.default_rng(7)
    B, H, KVH, L, d, n, k = 1, 4, 2, 520, 64, 4096, 16  # 2 080 query rows: the prefill path
    assert B * H * L >= fused_attention.MATMUL_ROWS
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    keys = rng.standard_normal((KVH, n, d))
    for g in range(KVH):
        w = rng.standard_normal((120, d))
        w -= np.outer(w @ u, u)
        w /= np.linalg.norm(w, axis=1, keepdims=True)
        c = 0.99 + rng.uniform(0, 1e-3, 120)  # cosines to u
        keys[g, :120] = (c[:, None] * u + np.sqrt(1 - c**2)[:, None] * w) * rng.uniform(0.5, 3, (120, 1))
        keys[g, 200] = u * 70000.0  # q . k / |q| > 65 504: inf in float16
        keys[g, 201] = -u * 70000.0
    q = (u * 5 + rng.standard_normal((B, H, L, d)) * 0.01).astype(np.float32)
    keys_mx = mx.array(keys.astype(np.float32)).astype(dtype)
    keys64 = np.array(keys_mx.astype(mx.float32)).astype(np.float64)  # what the kernel sees
    inv = mx.rsqrt(mx.maximum(mx.sum(keys_mx.astype(mx.float32) ** 2, axis=-1), 1e-24))
    rows, dots = fused_attention.top_k_rows(mx.array(q), mx.contiguous(keys_mx.swapaxes(-1, -2)), inv, k, None)
    rows, dots = np.array(rows), np.array(dots)
    cos, raw = _np_cosines(q.astype(np.float64), keys64)
    kth = -np.sort(-cos, axis=-1)[..., k - 1]
    for idx in np.ndindex(B, H, L):
        got = rows[idx]
        assert (got >= 0).all() and len(set(got.tolist())) == k
        assert got[0] == 200  # the overflowing parallel row is the top-1
        assert (cos[idx][got] >= kth[idx] - SLACK).all()
        np.testing.assert_allclose(dots[idx], raw[idx][got], rtol=1e-5, atol=1e-3)
    if dtype == mx.float16:  # the draw is hard: ranking by the float16 scores alone would fail
        unit = (q / np.linalg.norm(q, axis=-1, keepdims=True)).astype(np.float16).astype(np.float64)
        with np.errstate(over="ignore"):  # the two long rows overflow, as on the GPU
            approx = _np_cosines(unit, keys64)[1].astype(np.float16).astype(np.float64)
        approx *= 1 / np.linalg.norm(np.repeat(keys64, H // KVH, axis=0), axis=-1)[None, :, None, :]
        by_approx = np.argsort(-approx, axis=-1, kind="stable")[..., :k]
        wrong = (np.take_along_axis(cos, by_approx, -1) < kth[..., None] - SLACK).any(-1)
        assert wrong.mean() > 0.5


def _layer(path, head_dim=None):
    build_llama(path, hidden=128, heads=8, kv_heads=2, head_dim=head_dim, seed=5)
    model, _ = load(str(path))
    state = install(model)
    return state, model.layers[1].self_attn


def _run(state, attn, x, chunks, fused, mask_fn=None, **ctx):
    """x [B, T, hidden] through one layer in chunks (an mlx-lm KVCache), fused or portable;
    returns (outputs [B, T, hidden], the recorded rows per chunk, the attention mass per chunk)."""
    state.fused = fused
    record, mass = [], []
    state.memory = MemoryContext(ctx.pop("retriever"), record=record, mass=mass, **ctx)
    cache = KVCache()
    outs, start = [], 0
    for n in chunks:
        h = x[:, start : start + n]
        mask = mask_fn(h, cache) if mask_fn else create_attention_mask(h, cache)
        outs.append(attn(h, mask, cache))
        start += n
    state.memory = None
    out = mx.concatenate(outs, axis=1)
    mx.eval(out, [r.rows for _, r in record], [m for _, m in mass])
    return np.array(out), [np.array(r.rows) for _, r in record], [np.array(m) for _, m in mass]


class _Recording(LocalRetriever):
    """The portable path's retriever, keeping the rotated queries it is asked with."""

    def __init__(self, banks):
        super().__init__(banks)
        self.queries = []

    def retrieve(self, layer, queries, top_k, threshold):
        self.queries.append(np.array(queries))
        return super().retrieve(layer, queries, top_k, threshold)


def _retriever(cfg_kvh, d, n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    keys = [rng.standard_normal((cfg_kvh, n, d)).astype(np.float32) for _ in range(2)]
    values = [rng.standard_normal((cfg_kvh, n, d)).astype(np.float32) for _ in range(2)]
    if dtype != np.float32:
        keys = [k.astype(dtype) for k in keys]
        values = [v.astype(dtype) for v in values]
    return _Recording([bank_from_numpy("m", "1", keys, values)]), keys[1].astype(np.float64)


def _has_margin(queries, keys, top_k, threshold, margin=1e-4) -> bool:
    """No query's k-th best cosine lies within ``margin`` of the next one or of the threshold:
    the retrieved sets then cannot depend on float32 rounding."""
    for q in queries:  # [B, KVH, rep, L, d]
        B, kvh, rep, L, d = q.shape
        cos, _ = _np_cosines(q.reshape(B, kvh * rep, L, d).astype(np.float64), keys)
        top = -np.sort(-cos, axis=-1)
        k = min(top_k, top.shape[-1])
        if k < top.shape[-1] and (top[..., k - 1] - top[..., k]).min() <= margin:
            return False
        if threshold is not None and np.abs(top[..., :k] - threshold).min() <= margin:
            return False
    return True


def _compare(state, attn, chunks, n, d, bank_dtype, **kw):
    """Portable vs fused on inputs drawn (seeds in order) so that every top-k has a margin."""
    for seed in range(1, 30):
        x = mx.random.normal((2, sum(chunks), 128), key=mx.random.key(seed))
        retriever, keys = _retriever(2, d, n, bank_dtype)
        want = _run(state, attn, x, chunks, False, retriever=retriever, **kw)
        if _has_margin(retriever.queries, keys, kw["top_k"], kw["threshold"]):
            got = _run(state, attn, x, chunks, True, retriever=_retriever(2, d, n, bank_dtype)[0], **kw)
            return got, want
    raise AssertionError("no seed gave inputs with a margin at the top-k boundary")


def _same_sets(a, b):
    """Recorded rows of the two paths hold the same row sets per query head and token (their
    order within a top-k is free)."""
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        np.testing.assert_array_equal(np.sort(x, axis=-1), np.sort(y, axis=-1))


@needs_cuda
@pytest.mark.parametrize(
    "chunks,top_k,threshold,n,bank_dtype,head_dim,matmul_rows",
    [
        ([9], 3, None, 25, np.float32, None, None),  # prefill, causal
        ([5, 3, 1, 1, 1], 4, None, 300, np.float32, None, None),  # chunked prefill, then decode (no mask)
        ([6, 1, 1], 40, None, 25, np.float32, None, None),  # top_k > rows: every row
        ([7, 2, 1], 4, 0.05, 300, np.float32, None, None),  # threshold
        ([4, 1, 1], 10, None, 2000, np.float16, None, None),  # half-precision bank
        ([4, 1, 1], 5, None, 500, np.float32, 48, None),  # head size not a multiple of 32
        # prefill: the 2 x 8 x 12 query rows take the matmul path (rows >= 100 here)
        ([12, 1], 6, None, 700, np.float16, None, 100),
    ],
)
@pytest.mark.parametrize("launches", [1, 2])  # a decode layer: one kernel, or the scan + attend
def test_fused_layer_matches_the_portable_path(
    tmp_path, monkeypatch, chunks, top_k, threshold, n, bank_dtype, head_dim, matmul_rows, launches
):
    monkeypatch.setattr(fused_attention, "SCAN_IN_ATTEND", 1 << 30 if launches == 1 else 0)
    if matmul_rows is not None:
        monkeypatch.setattr(fused_attention, "MATMUL_ROWS", matmul_rows)
    calls = []
    attend = fused_attention.attend_top_k
    monkeypatch.setattr(fused_attention, "attend_top_k", lambda *a, **kw: calls.append(1) or attend(*a, **kw))
    state, attn = _layer(tmp_path, head_dim)
    d = head_dim or 16
    (got, got_rows, got_mass), (want, want_rows, want_mass) = _compare(
        state, attn, chunks, n, d, bank_dtype, top_k=top_k, threshold=threshold
    )
    assert len(calls) == len(chunks)  # every forward of the fused run took the kernels
    _same_sets(got_rows, want_rows)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for g, w in zip(got_mass, want_mass):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize(
    "chunks,top_k,threshold,n,bank_dtype,padded",
    [
        ([9], 3, None, 25, np.float32, False),  # prefill, causal
        ([7, 6, 1], 4, 0.05, 300, np.float32, False),  # a chunk after a cached one, threshold, decode
        ([12, 1], 6, None, 700, np.float16, False),  # half-precision bank
        ([6, 5, 1], 4, None, 200, np.float32, True),  # left padding (a boolean mask)
    ],
)
def test_fused_prefill_by_log_sum_exp_matches_the_portable_path(
    tmp_path, monkeypatch, chunks, top_k, threshold, n, bank_dtype, padded
):
    """Prefill chunks take prefill_attention (MLX's fused attention merged with the memories);
    the decode steps the attend kernel; every output, retrieved set and attention mass equals the
    portable path's."""
    monkeypatch.setattr(prefill_attention, "MIN_QUERIES", 4)
    calls = []
    split = prefill_attention.attend
    monkeypatch.setattr(prefill_attention, "attend", lambda *a, **kw: calls.append(1) or split(*a, **kw))

    def pad_mask(h, cache):
        L, S = h.shape[1], cache.offset + h.shape[1]
        causal = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
        pad = mx.array([[False] * 3 + [True] * (S - 3), [True] * S])[:, None, None, :]
        return mx.logical_and(causal[None, None], pad)

    state, attn = _layer(tmp_path)
    extra = {"mask_fn": pad_mask} if padded else {}
    (got, got_rows, got_mass), (want, want_rows, want_mass) = _compare(
        state, attn, chunks, n, 16, bank_dtype, top_k=top_k, threshold=threshold, **extra
    )
    assert len(calls) == sum(c >= 4 for c in chunks)
    _same_sets(got_rows, want_rows)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    for g, w in zip(got_mass, want_mass):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


@needs_cuda
def test_fused_layer_takes_a_boolean_padding_mask(tmp_path):
    """A left-padded batch (as mlx-lm's BatchKVCache masks it): row 0 has 3 padding positions."""
    state, attn = _layer(tmp_path)

    def padded(h, cache):
        L, S = h.shape[1], cache.offset + h.shape[1]
        causal = mx.arange(S - L, S)[:, None] >= mx.arange(S)[None]
        pad = mx.array([[False] * 3 + [True] * (S - 3), [True] * S])[:, None, None, :]
        return mx.logical_and(causal[None, None], pad)

    (got, got_rows, _), (want, want_rows, _) = _compare(
        state, attn, [6, 1, 1], 200, 16, np.float32, top_k=4, threshold=None, mask_fn=padded
    )
    _same_sets(got_rows, want_rows)
    # Padding positions attend to their memories only, on both paths.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@needs_cuda
def test_attend_takes_a_long_context_after_a_short_one():
    """Each shared-memory size is its own compiled kernel: MLX opts a kernel in to more than
    48 KiB of shared memory only at its first launch, so a long context after a short one failed
    while they shared one."""
    rng = np.random.default_rng(4)
    B, H, KVH, d, n = 1, 4, 2, 64, 300
    keys = mx.array(rng.standard_normal((KVH, n, d)).astype(np.float32))
    bank_values = rng.standard_normal((KVH, n, d)).astype(np.float32)
    inv = mx.rsqrt(mx.sum(keys * keys, axis=-1))
    for S in (100, 20000 if fused_attention.max_local_positions() > 16384 else 12000):
        q = rng.standard_normal((B, H, 1, d)).astype(np.float32)
        k = rng.standard_normal((B, KVH, S, d)).astype(np.float32) * 0.2
        v = rng.standard_normal((B, KVH, S, d)).astype(np.float32)
        rows, dots = fused_attention.top_k_rows(mx.array(q), mx.contiguous(keys.swapaxes(-1, -2)), inv, 8, None)
        mask = fused_attention.mask_mode(None, B, 1, S)
        out, _ = fused_attention.attend(
            mx.array(q), mx.array(k), mx.array(v), mask, rows, dots, mx.array(bank_values), 0.125, mx.float32
        )
        unmasked = np.ones((B, 1, S), bool)
        want, _ = attend_over_picks(q, k, v, unmasked, np.array(rows), np.array(dots), bank_values, 0.125)
        np.testing.assert_allclose(np.array(out), want, rtol=1e-4, atol=1e-5)


def test_mask_mode_converts_one_forward_mask_once():
    """mlx-lm hands every layer of a forward the same mask array: the kernel's [B, L, S] copy is
    made once per forward and equals the mask broadcast; another mask (even an equal one) or
    other sizes are converted anew. Plain MLX ops: runs on any backend."""
    mask = mx.array(np.tril(np.ones((3, 5), bool), 2)[None, None].repeat(2, 0))  # [2, 1, 3, 5]
    mode, first = fused_attention.mask_mode(mask, 2, 3, 5)
    assert mode == fused_attention._ARRAY_MASK
    assert fused_attention.mask_mode(mask, 2, 3, 5)[1] is first  # the next layer: no new copy
    np.testing.assert_array_equal(np.array(first), np.array(mask)[:, 0])
    other = mx.array(np.array(mask))
    assert fused_attention.mask_mode(other, 2, 3, 5)[1] is not first
    row = mx.array(np.ones((2, 1, 1, 5), bool))  # a decode step's [B, 1, 1, S] broadcast to [B, L, S]
    _, wide = fused_attention.mask_mode(row, 2, 1, 5)
    assert wide.shape == (2, 1, 5) and np.array(wide).all()
    assert fused_attention.mask_mode(mx.zeros((2, 1, 3, 5)), 2, 3, 5) is None  # additive: portable path


async def test_a_scheduler_step_leaves_no_mask_remembered(llama_path):
    """mask_mode remembers the last mask it converted, for the next layers of the same forward;
    after a scheduler step nothing is remembered, so a forward's mask (a long prefill chunk's
    [B, 1, L, S]: hundreds of MiB) is not held while the group decodes without a mask (an unpadded
    batch) or the generator sits idle. Runs on any backend (the mask is remembered by hand here:
    off CUDA no layer converts one)."""
    from services.generator.request_types import GenerationRequest, Sampling

    from .helpers import run

    mask = mx.array(np.ones((1, 1, 4, 8), bool))
    assert fused_attention.mask_mode(mask, 1, 4, 8) is not None
    held = weakref.ref(mask)
    del mask
    assert held() is not None  # remembered: the next layer of its forward takes the same copy
    chunk_mask = mx.array(np.tril(np.ones((4, 8), bool), 4)[None, None])  # a prompt chunk's causal mask
    assert prefill_attention.causal_when_equal(chunk_mask) == "causal"
    held_chunk = weakref.ref(chunk_mask)
    del chunk_mask
    assert held_chunk() is not None
    engine = GeneratorEngine(EngineConfig(model=str(llama_path)))
    engine.start()
    try:
        _, _, _, final = await run(
            engine, GenerationRequest(engine.tokenizer.encode("Water boils at"), Sampling(max_tokens=2))
        )
    finally:
        engine.stop()
    assert final.completion_tokens >= 1
    assert held() is None, "the mask of a forward is still held after the step"
    assert held_chunk() is None, "a prompt chunk's mask is still held after the step"
