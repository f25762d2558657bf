"""prefill_attention.attend (a prefill's local attention by MLX's fused attention, merged with the
memories by log-sum-exp) against a float64 numpy softmax over [memories | local context]: causal
masks with a cached prefix, a left-padding mask, thresholded (masked) memories, GQA, float32 and
float16 inputs. Runs on any backend (on CUDA it is the fused path's prefill)."""

import mlx.core as mx
import numpy as np
import pytest

from services.generator import prefill_attention

from .helpers import LAST_AXIS_LAYOUTS, last_axis_layout, prefill_picks
from .np_reference import attend_over_picks


@pytest.mark.parametrize(
    "dtype,mask_kind,prefix,d,k",
    [
        (np.float32, "causal", 0, 16, 5),
        (np.float32, "causal", 7, 16, 5),  # a chunk after 7 cached positions
        (np.float32, "padding", 0, 16, 5),  # row 0 left-padded by 3 positions (bool mask, as BatchKVCache)
        (np.float16, "causal", 5, 16, 5),
        (np.float32, "none", 40, 80, 32),  # no mask; a head size past one warp's 32 lanes; 32 memories
        (np.float16, "padding", 3, 128, 10),
    ],
)
@pytest.mark.parametrize("chunk_rows", [None, 4])  # 4: the queries merged 4 rows at a time (4, 4, 1)
def test_matches_one_softmax_over_memories_and_context(dtype, mask_kind, prefix, d, k, chunk_rows, monkeypatch):
    rng = np.random.default_rng(0)
    B, H, KVH, L, n = 2, 4, 2, 9, 30
    S = prefix + L
    if chunk_rows:
        monkeypatch.setattr(prefill_attention, "MIN_QUERIES", 1)
        monkeypatch.setattr(prefill_attention, "MAX_LOGITS", B * H * chunk_rows * S)
        chunks = []
        split = prefill_attention._attend
        monkeypatch.setattr(
            prefill_attention, "_attend", lambda *a, **kw: chunks.append(a[0].shape[2]) or split(*a, **kw)
        )
    scale = d**-0.5
    q = rng.standard_normal((B, H, L, d)).astype(dtype)
    kk = rng.standard_normal((B, KVH, S, d)).astype(dtype)
    v = rng.standard_normal((B, KVH, S, d)).astype(dtype)
    bank_values = rng.standard_normal((KVH, n, d)).astype(dtype)
    rows, dots, mask, allowed = prefill_picks(rng, B, H, L, S, n, k, mask_kind)
    out, mass = prefill_attention.attend(
        mx.array(q),
        mx.array(kk),
        mx.array(v),
        mask,
        mx.array(rows),
        mx.array(dots),
        mx.array(bank_values),
        scale,
        mx.float32,
    )
    want, want_mass = attend_over_picks(
        *(a.astype(np.float64) for a in (q, kk, v)), allowed, rows, dots, bank_values.astype(np.float64), scale
    )
    # Rows of queries that attend nothing (left padding) and have memories read the memories only.
    tol = 1e-5 if dtype == np.float32 else 2e-3  # float16: the fused attention's output is rounded to float16
    assert out.dtype == mx.float32 and out.shape == (B, L, H * d) and mass.shape == (B, H, L)
    if chunk_rows:
        assert chunks == [4, 4, 1]
    np.testing.assert_allclose(np.array(out), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.array(mass), want_mass, rtol=1e-5, atol=1e-6)
    assert np.array(mass)[1, 0, 0] == 0.0


@pytest.mark.parametrize("layout", LAST_AXIS_LAYOUTS)
@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_strided_16_bit_inputs_match_one_softmax(dtype, layout):
    """Queries, keys and values as a model's cache holds them (slices of longer buffers) in a 16-bit
    dtype, two 16-row tiles of queries (the second part-filled): on CUDA (compute capability >= 8.0)
    the tensor-core merge, which reads their strides, pairs of elements in one 4-byte load where they
    are aligned ("cache"), else one by one: queries and keys cut from a buffer one element wider
    (odd offsets and row strides: a 4-byte load there would fault) or every other element of one
    twice as wide."""
    rng = np.random.default_rng(2)
    B, H, KVH, L, prefix, d, k, n = 2, 4, 2, 19, 5, 64, 8, 30
    S = prefix + L
    width, cut = last_axis_layout(layout, d)

    def rounded(shape):
        x = mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)
        return x, np.array(x.astype(mx.float32)).astype(np.float64)

    q, q64 = rounded((B, H, L + 3, width))
    kbuf, k64 = rounded((B, KVH, S + 5, width))
    vbuf, v64 = rounded((B, KVH, S + 5, d))
    bank, bank64 = rounded((KVH, n, d))
    rows, dots, mask, allowed = prefill_picks(rng, B, H, L, S, n, k, "padding")
    out, mass = prefill_attention.attend(
        q[:, :, 2 : L + 2, cut],
        kbuf[:, :, :S, cut],
        vbuf[:, :, :S],
        mask,
        mx.array(rows),
        mx.array(dots),
        bank,
        d**-0.5,
        dtype,
    )
    want, want_mass = attend_over_picks(
        q64[:, :, 2 : L + 2, cut], k64[:, :, :S, cut], v64[:, :, :S], allowed, rows, dots, bank64, d**-0.5
    )
    tol = 2e-2 if dtype == mx.bfloat16 else 3e-3  # the local output and the result rounded to the dtype
    assert out.dtype == dtype
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), want, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.array(mass), want_mass, rtol=2e-5, atol=1e-6)


def test_a_padded_query_with_memories_reads_only_them():
    """A left-padding position (no local position allowed) puts all its weight on its memories,
    whatever the fused attention returns for a row it masks entirely."""
    rng = np.random.default_rng(1)
    B, H, L, d, n, k = 1, 2, 4, 8, 10, 3
    q = rng.standard_normal((B, H, L, d)).astype(np.float32)
    kv = rng.standard_normal((B, 1, L, d)).astype(np.float32)
    bank_values = rng.standard_normal((1, n, d)).astype(np.float32)
    rows = rng.integers(0, n, (B, H, L, k)).astype(np.int32)
    dots = rng.standard_normal((B, H, L, k)).astype(np.float32)
    allowed = np.tril(np.ones((L, L), bool))
    allowed[:, :2] = False  # positions 0 and 1 are padding
    out, mass = prefill_attention.attend(
        mx.array(q),
        mx.array(kv),
        mx.array(kv),
        mx.array(allowed[None, None]),
        mx.array(rows),
        mx.array(dots),
        mx.array(bank_values),
        d**-0.5,
        mx.float32,
    )
    want, _ = attend_over_picks(q.astype(np.float64), kv, kv, allowed[None], rows, dots, bank_values, d**-0.5)
    assert np.isfinite(np.array(out)).all()
    np.testing.assert_allclose(np.array(mass)[0, :, :2], 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.array(out), want, rtol=1e-5, atol=1e-5)


def test_fits_takes_long_batches_of_queries_within_the_logits_bound():
    assert not prefill_attention.fits(1, 32, 1, 4096)  # a decode step: the attend kernel
    assert prefill_attention.fits(1, 32, prefill_attention.MIN_QUERIES, 4096)
    assert prefill_attention.fits(1, 32, 2048, 2048)  # a whole default prefill chunk: merged in chunks of rows
    assert not prefill_attention.fits(8, 32, 2048, 16384)  # even MIN_QUERIES rows hold too many logits


def test_causal_when_equal_recognizes_mlx_lms_batch_masks():
    """mlx-lm's batch KV cache masks: unpadded ones (fresh or after a cached prefix) become
    "causal"; a left-padded one, a sliding window that bites, a query-length-1 mask and
    non-boolean masks stay as they are."""
    from mlx_lm.models.base import create_causal_mask

    prefill_attention.forget_masks()
    for L, offset in ((6, 0), (4, 5)):
        mask = create_causal_mask(L, offset=offset, left_padding=mx.zeros((3,), mx.int32))
        assert mask.shape == (3, 1, L, L + offset)
        assert prefill_attention.causal_when_equal(mask) == "causal"
        assert prefill_attention.causal_when_equal(create_causal_mask(L, offset=offset)) == "causal"  # [L, S]
    padded = create_causal_mask(6, offset=0, left_padding=mx.array([0, 2]))
    window = create_causal_mask(6, offset=4, window_size=3)
    additive = mx.where(create_causal_mask(6), 0.0, -1e9)
    per_head = mx.broadcast_to(create_causal_mask(6)[None, None], (1, 2, 6, 6))
    one_query = create_causal_mask(1, offset=5)
    for mask in (padded, window, additive, per_head, one_query):
        assert prefill_attention.causal_when_equal(mask) is mask
    assert prefill_attention.causal_when_equal(None) is None
    assert prefill_attention.causal_when_equal("causal") == "causal"


def test_causal_when_equal_remembers_per_mask_object_until_forgotten():
    """One read per mask object: a remembered answer is reused for the same object (every layer
    of a forward), a different object is checked on its own, and forget_masks drops them all."""
    from mlx_lm.models.base import create_causal_mask

    prefill_attention.forget_masks()
    causal = create_causal_mask(5, offset=2, left_padding=mx.zeros((1,), mx.int32))
    padded = create_causal_mask(5, offset=2, left_padding=mx.array([1]))
    assert prefill_attention.causal_when_equal(causal) == "causal"
    assert prefill_attention.causal_when_equal(padded) is padded  # alternating objects: both kept
    assert len(prefill_attention._causal_answers) == 2
    assert prefill_attention.causal_when_equal(causal) == "causal"
    prefill_attention.forget_masks()
    assert prefill_attention._causal_answers == {}
