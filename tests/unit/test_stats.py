"""The paired statistics behind every win rate: outcomes per prompt, bootstrap intervals."""

from __future__ import annotations

import math

import pytest

from stages.stats import bootstrap_ci, summary, win_outcomes


def test_win_outcomes_count_ties_half():
    assert win_outcomes([1, 2, 3], [1, 1, 4]) == [0.5, 1.0, 0.0]


def test_bootstrap_interval_brackets_the_mean_and_repeats_by_seed():
    lo, hi = bootstrap_ci([0.0, 1.0] * 50, 500, seed=0)
    assert lo < 0.5 < hi and hi - lo < 0.3
    assert bootstrap_ci([0.0, 1.0] * 50, 500, 0) == bootstrap_ci([0.0, 1.0] * 50, 500, 0)
    assert bootstrap_ci([0.0, 1.0] * 50, 500, 0) != bootstrap_ci([0.0, 1.0] * 50, 500, 1)


def test_bootstrap_edge_cases():
    # No resamples: the mean twice; no values: NaN, not an exception.
    assert bootstrap_ci([0.2, 0.4], 0, 0) == pytest.approx((0.3, 0.3))
    assert all(math.isnan(v) for v in bootstrap_ci([], 100, 0))
    assert summary([1.0, 0.0, 1.0, 1.0], 0, 0) == {"mean": 0.75, "ci95": [0.75, 0.75], "n": 4}
