"""The tie-aware ranking comparison accepts ties and nothing looser."""

import numpy as np
import pytest

from tests.ranking import assert_catches_planted_errors, assert_ranking_matches


def test_catches_off_by_one_and_swaps_with_a_margin():
    scores = np.random.default_rng(0).standard_normal(50)
    assert_catches_planted_errors(scores, 7, eps=1e-5)


def test_accepts_only_swaps_inside_the_slack():
    scores = np.array([0.9, 0.5, 0.5 + 5e-6, 0.1, 0.0])
    assert_ranking_matches([0, 1, 2], scores, 3, eps=1e-5)  # the near-tie in either order
    assert_ranking_matches([0, 2, 1], scores, 3, eps=1e-5)
    with pytest.raises(AssertionError, match="out of order"):
        assert_ranking_matches([1, 0, 2], scores, 3, eps=1e-5)
    with pytest.raises(AssertionError, match="below the k-th"):
        assert_ranking_matches([0, 1, 3], scores, 3, eps=1e-5)
    with pytest.raises(AssertionError, match="below the k-th"):
        assert_ranking_matches([1, 2, 0], np.array([0.5, 0.9, 0.8, 0.7]), 3, eps=1e-5)
    with pytest.raises(AssertionError, match="repeated"):
        assert_ranking_matches([0, 1, 1], scores, 3, eps=1e-5)
