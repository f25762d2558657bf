"""Tie-aware comparison of a ranking against an independent reference's scores.

A top-k list is a discrete outcome: two candidates whose reference scores are within rounding of
each other may come in either order, or either may take the last place, depending on the BLAS,
the summation order or the processor. Everything else must match exactly.
"""

from __future__ import annotations

import numpy as np


def assert_ranking_matches(got_ids, ref_scores, k: int, eps: float) -> None:
    """``got_ids`` (indices into ``ref_scores``, best first) is the reference's top-``k`` up to ties.

    Allowed: swapping two candidates whose reference scores differ by at most ``eps``. Not allowed:
    a wrong length, a repeated id, an out-of-order pair further apart than ``eps``, a candidate
    below the k-th reference score by more than ``eps``, or leaving out a candidate that beats the
    k-th reference score by more than ``eps``.
    """
    ref = np.asarray(ref_scores, dtype=np.float64)
    got = [int(i) for i in got_ids]
    k = min(k, ref.shape[0])
    assert len(got) == k, f"{len(got)} results, want {k}"
    assert len(set(got)) == k, f"an id is repeated in {got}"
    scores = ref[got]
    for i in range(k - 1):
        assert scores[i] >= scores[i + 1] - eps, (
            f"positions {i} and {i + 1} ({got[i]}: {scores[i]:.6f}, {got[i + 1]}: {scores[i + 1]:.6f}) "
            f"are out of order by more than {eps}"
        )
    kth = np.sort(ref)[::-1][k - 1]
    low = [i for i in got if ref[i] < kth - eps]
    assert not low, f"{low} score below the k-th reference score {kth:.6f} by more than {eps}"
    missing = [i for i in np.flatnonzero(ref > kth + eps) if i not in set(got)]
    assert not missing, f"{missing} beat the k-th score {kth:.6f} by more than {eps} but are missing"


def assert_catches_planted_errors(ref_scores, k: int, eps: float) -> None:
    """Shows the comparison is not loose: the exact top-k passes; an off-by-one top-k (rank k+1
    instead of rank k) and a swapped pair are rejected, where the scores leave a margin."""
    ref = np.asarray(ref_scores, dtype=np.float64)
    order = list(np.argsort(-ref, kind="stable"))
    assert_ranking_matches(order[:k], ref, k, eps)
    gaps = -np.diff(ref[order][: k + 1])
    assert gaps.min() > eps, f"the reference's top-{k + 1} scores are within {eps}: pick other inputs"
    for wrong in (order[: k - 1] + [order[k]], [order[1], order[0]] + order[2:k]):
        try:
            assert_ranking_matches(wrong, ref, k, eps)
        except AssertionError:
            continue
        raise AssertionError(f"the comparison accepted a wrong ranking {wrong}")
