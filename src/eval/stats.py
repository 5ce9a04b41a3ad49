"""Significance of a difference between two predictors: a paired t-test over seeds and a paired bootstrap
interval over test samples.

- Over seeds: seed k of one predictor is paired with seed k of the other (same data order, same
  initialisation seed); the test asks whether the mean of the per-seed differences is zero. Two-sided,
  Student's t with n - 1 degrees of freedom. Its p-value needs the regularised incomplete beta function,
  computed here (numpy only) by the continued fraction of Numerical Recipes § 6.4 (Lentz's method).
- Over test samples: the same resampled sample indices for both predictors (and every seed), so the
  interval reflects how much the difference depends on which test samples happened to be drawn.
"""
from __future__ import annotations

import math

import numpy as np

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
# The robustness command's defaults (its --bootstrap flag sets the rounds).
DEFAULT_ROUNDS = 1000
DEFAULT_SEED = 0
LEVEL = CONFIDENCE


def _beta_continued_fraction(a: float, b: float, x: float, iterations: int = 300, eps: float = 1e-15) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, iterations + 1):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b), for a, b > 0 and 0 <= x <= 1."""
    if not (a > 0 and b > 0):
        raise ValueError(f"incomplete_beta needs a, b > 0, got a={a}, b={b}")
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"incomplete_beta needs 0 <= x <= 1, got {x}")
    if x in (0.0, 1.0):
        return x
    log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); beyond, use the symmetry.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with `df` degrees of freedom."""
    if math.isnan(t) or df <= 0:
        return math.nan
    if math.isinf(t):
        return 0.0
    return incomplete_beta(df / 2.0, 0.5, df / (df + t * t))


def paired_t_test(first, second) -> dict:
    """The paired t-test of `second - first` (equal-length sequences, paired by position).

    Returns {"n", "mean", "std", "t", "p"}: the differences' mean and sample std (ddof = 1) and the
    two-sided p-value. With fewer than two pairs there is no test (std, t and p are nan); differences
    that are all equal give t = ±inf and p = 0 (p = nan when they are all 0).
    """
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.shape != second.shape or first.ndim != 1:
        raise ValueError(f"paired values must be two sequences of one length, got {first.shape} and {second.shape}")
    differences = second - first
    n = len(differences)
    mean = float(differences.mean()) if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "std": math.nan, "t": math.nan, "p": math.nan}
    std = float(differences.std(ddof=1))
    if std == 0.0:
        t = math.nan if mean == 0.0 else math.copysign(math.inf, mean)
    else:
        t = mean / (std / math.sqrt(n))
    return {"n": n, "mean": mean, "std": std, "t": t, "p": t_two_sided_p(t, n - 1)}


def paired_bootstrap(first_hits, second_hits, resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                     seed: int = 0) -> dict:
    """A percentile interval of mean(second) - mean(first) over test samples.

    `first_hits`, `second_hits`: (seeds, N) per-sample scores whose mean over samples is the metric
    (src/eval/metrics.py headline_hits), row k of both from seed k. Each resample draws N sample indices
    with replacement, the same for both predictors and every seed, and takes the mean over seeds of the
    difference. Returns {"mean", "low", "high", "confidence", "resamples"}; a fixed `seed` makes it
    reproducible.
    """
    first = np.atleast_2d(np.asarray(first_hits, dtype=np.float64))
    second = np.atleast_2d(np.asarray(second_hits, dtype=np.float64))
    if first.shape != second.shape or first.shape[1] == 0:
        raise ValueError(f"paired per-sample scores must have one shape (seeds, N > 0), got {first.shape} "
                         f"and {second.shape}")
    # The difference of means over seeds is the mean of the per-sample differences averaged over seeds.
    per_sample = (second - first).mean(axis=0)
    rng = np.random.default_rng(seed)
    n = per_sample.size
    estimates = np.empty(resamples)
    for start in range(0, resamples, 256):  # blocks bound the (block, N) index matrix
        block = min(256, resamples - start)
        estimates[start:start + block] = per_sample[rng.integers(0, n, size=(block, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(estimates, [tail, 1.0 - tail])
    return {"mean": float(per_sample.mean()), "low": float(low), "high": float(high), "confidence": confidence,
            "resamples": resamples}


def paired_interval(first, second, rounds: int = DEFAULT_ROUNDS, seed: int = DEFAULT_SEED,
                    level: float = LEVEL) -> dict:
    """{difference, low, high, rounds, n}: mean(first) - mean(second) over one run's test rows (1-d per-sample
    scores, paired by position) and its paired bootstrap interval; a predictor against itself gives exactly 0.
    The robustness file's form of `paired_bootstrap`."""
    first, second = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if first.shape != second.shape:
        raise ValueError(f"paired scores must be of one shape, got {first.shape} and {second.shape}")
    n = len(first)
    if n == 0:
        return {"difference": None, "low": None, "high": None, "rounds": rounds, "n": 0}
    interval = paired_bootstrap(second, first, resamples=rounds, confidence=level, seed=seed)
    return {"difference": interval["mean"], "low": interval["low"], "high": interval["high"], "rounds": rounds,
            "n": n}
