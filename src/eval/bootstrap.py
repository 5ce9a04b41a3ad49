"""Paired bootstrap intervals for the difference between two predictors scored on the same samples.

Both predictors are scored on the same resampled rows in every round (a paired bootstrap), so what
varies between rounds is the sample, not the pairing; a predictor against itself gives exactly 0.
The statistic is the headline metric's mean of per-sample scores (metrics.headline_hits).
"""
from __future__ import annotations

import numpy as np

DEFAULT_ROUNDS = 1000
DEFAULT_SEED = 0
LEVEL = 0.95


def paired_interval(first: np.ndarray, second: np.ndarray, rounds: int = DEFAULT_ROUNDS,
                    seed: int = DEFAULT_SEED, level: float = LEVEL) -> dict:
    """{difference, low, high, rounds, n}: mean(first) - mean(second) on the rows given and the
    percentile interval of that difference over `rounds` resamples of those rows (seeded)."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.shape != second.shape:
        raise ValueError(f"paired scores must be of one shape, got {first.shape} and {second.shape}")
    n = len(first)
    if n == 0:
        return {"difference": None, "low": None, "high": None, "rounds": rounds, "n": 0}
    difference = first - second  # paired: one difference per sample, resampled as a whole
    rng = np.random.default_rng(seed)
    means = np.array([difference[rng.integers(0, n, n)].mean() for _ in range(rounds)])
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return {"difference": float(difference.mean()), "low": float(low), "high": float(high), "rounds": rounds, "n": n}
