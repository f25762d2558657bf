"""The per-request tallies kept on the device (citations.Counts, attention_mass.MassSum) equal a
host-side count over every step, across their every-few-steps flushes and any batch row."""

import mlx.core as mx
import numpy as np

from services.generator.attention_mass import MassSum
from services.generator.citations import Counts, Picks


def test_counts_equal_a_bincount_over_every_step_and_flush():
    rng = np.random.default_rng(0)
    rows, layers, B, H, k = 50, 3, 4, 2, 5
    steps = 2 * Counts.FLUSH_STEPS + 7  # two flushes and a remainder read at the end
    counts = Counts(rows)
    want = np.zeros(rows, np.int64)
    for _ in range(steps):
        fwd = rng.integers(-1, rows, (layers, B, H, 1, k)).astype(np.int32)  # -1 = masked
        b = int(rng.integers(B))
        counts.add([Picks(mx.array(a)) for a in fwd], b)
        picked = fwd[:, b].reshape(-1)
        want += np.bincount(picked[picked >= 0], minlength=rows)
    got = counts.read()
    assert got.dtype == np.int32 and got.shape == (rows,)
    np.testing.assert_array_equal(got, want)


def test_weighed_counts_keep_only_picks_with_enough_attention_across_flushes():
    """With a floor, a pick counts only when its softmax weight (rebuilt at the flush from the raw
    dots, the head's memory mass and the layer's scale; two scales in one request) reaches it:
    equal to a host-side count of a direct softmax over [memories | local], weights near the floor
    left out of the draw."""
    rng = np.random.default_rng(2)
    rows, B, H, k, S, floor = 40, 3, 2, 4, 6, 0.1
    scales = (0.25, 0.5)
    counts = Counts(rows, floor)
    want = np.zeros(rows, np.int64)
    for _ in range(Counts.FLUSH_STEPS + 5):
        fwd, b = [], int(rng.integers(B))
        for scale in scales:
            while True:
                r = rng.integers(-1, rows, (B, H, 1, k)).astype(np.int32)
                dots = rng.normal(size=(B, H, 1, k)).astype(np.float32) * 6
                local = rng.normal(size=(B, H, 1, S)) * 6
                logits = np.concatenate([np.where(r >= 0, dots * scale, -np.inf), local * scale], -1)
                w = np.exp(logits - logits.max(-1, keepdims=True))
                w /= w.sum(-1, keepdims=True)
                if np.abs(w[..., :k] - floor).min() > 1e-3:  # no weight within rounding of the floor
                    break
            fwd.append(Picks(mx.array(r), mx.array(dots), mx.array(w[..., :k].sum(-1).astype(np.float32)), scale))
            kept = r[b][(w[b, ..., :k] >= floor) & (r[b] >= 0)]
            want += np.bincount(kept, minlength=rows)
        counts.add(fwd, b)
    assert want.sum() > 0
    np.testing.assert_array_equal(counts.read(), want)


def test_mass_means_equal_the_host_mean_over_every_step_and_head():
    rng = np.random.default_rng(1)
    layers, heads, B = [0, 2, 5], 4, 3
    steps = MassSum.FLUSH_STEPS + 9
    mass = MassSum(layers, heads)
    assert mass.means() == {}
    sums = np.zeros(len(layers))
    for _ in range(steps):
        fwd = rng.uniform(0, heads, (len(layers), B, 1)).astype(np.float32)  # sums over heads
        b = int(rng.integers(B))
        mass.add([mx.array(a) for a in fwd], b)
        sums += fwd[:, b, 0]
    got = mass.means()
    assert list(got) == layers
    np.testing.assert_allclose([got[i] for i in layers], sums / (steps * heads), rtol=1e-5)


def test_counts_flush_early_when_the_pending_picks_hold_much_memory(monkeypatch):
    """The pending picks are slices that keep their forwards' whole-batch arrays alive until the
    flush: past FLUSH_PICKS picks of those arrays the counts flush before FLUSH_STEPS steps (a
    large top-k would otherwise hold gigabytes), and count the same as a host-side bincount."""
    monkeypatch.setattr(Counts, "FLUSH_PICKS", 500)
    rng = np.random.default_rng(3)
    rows, layers, B, H, k = 60, 2, 4, 2, 16  # 128 picks of the batch per layer, 256 per step
    counts = Counts(rows)
    want = np.zeros(rows, np.int64)
    pending = []
    for _ in range(9):
        fwd = rng.integers(-1, rows, (layers, B, H, 1, k)).astype(np.int32)
        b = int(rng.integers(B))
        counts.add([Picks(mx.array(a)) for a in fwd], b)
        picked = fwd[:, b].reshape(-1)
        want += np.bincount(picked[picked >= 0], minlength=rows)
        pending.append(len(counts._pending) // layers)
    assert pending == [1, 0, 1, 0, 1, 0, 1, 0, 1]  # 512 picks in 2 steps: a flush every 2nd step
    np.testing.assert_array_equal(counts.read(), want)
