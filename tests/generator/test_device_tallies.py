"""The per-request tallies kept on the device (citations.Counts, attention_mass.MassSum) equal a
host-side count over every step, across their every-few-steps flushes and any batch row."""

import mlx.core as mx
import numpy as np

from services.generator.attention_mass import MassSum
from services.generator.citations import Counts


def test_counts_equal_a_bincount_over_every_step_and_flush():
    rng = np.random.default_rng(0)
    rows, layers, B, H, k = 50, 3, 4, 2, 5
    steps = 2 * Counts.FLUSH_STEPS + 7  # two flushes and a remainder read at the end
    counts = Counts(rows)
    want = np.zeros(rows, np.int64)
    for _ in range(steps):
        fwd = rng.integers(-1, rows, (layers, B, H, 1, k)).astype(np.int32)  # -1 = masked
        b = int(rng.integers(B))
        counts.add([mx.array(a) for a in fwd], b)
        picked = fwd[:, b].reshape(-1)
        want += np.bincount(picked[picked >= 0], minlength=rows)
    got = counts.read()
    assert got.dtype == np.int32 and got.shape == (rows,)
    np.testing.assert_array_equal(got, want)


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
