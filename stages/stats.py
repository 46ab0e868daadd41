"""Paired statistics of per-prompt gold scores: win outcomes and percentile-bootstrap
intervals over prompts. Shared by the eval stage and ``rlhf compare``; numpy only."""

from __future__ import annotations

import numpy as np


def bootstrap_ci(values, resamples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (``resamples`` 0 -> the mean twice)."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return float("nan"), float("nan")
    if resamples <= 0:
        return float(x.mean()), float(x.mean())
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    return float(lo), float(hi)


def win_outcomes(a, b) -> list[float]:
    """Per prompt: 1 when a's score beats b's, 0.5 on a tie, 0 otherwise."""
    return [1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)]


def summary(values, resamples: int, seed: int) -> dict:
    lo, hi = bootstrap_ci(values, resamples, seed)
    return {"mean": float(np.mean(values)) if len(values) else float("nan"), "ci95": [lo, hi],
            "n": len(values)}
