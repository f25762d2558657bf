"""extended_attention.top_rows: the two-stage top-k picks exactly the rows one partition picks."""

import mlx.core as mx
import numpy as np
import pytest

from services.generator.extended_attention import top_rows


@pytest.mark.parametrize(
    "n,k,m",
    [(4096, 10, 64), (4095, 10, 16), (65536, 10, 4), (1500, 7, 33), (5000, 3, 5), (70000, 50, 4), (600, 10, 8)],
)
def test_top_rows_are_the_k_largest(n, k, m):
    sim = np.random.default_rng(n).standard_normal((2, m, n)).astype(np.float32)
    got = np.sort(np.array(top_rows(mx.array(sim), k)), axis=-1)
    want = np.sort(np.argpartition(-sim, k - 1, axis=-1)[..., :k], axis=-1)
    np.testing.assert_array_equal(got, want)
