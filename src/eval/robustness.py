"""Debiasing where it should show: effect scaling (TE − α·NDE) and random missing modalities.

Effect scaling. The causal head reports the fused prediction (logits_te = Y_all) and the debiased one
(logits_tie = TE − NDE). Between and beyond them lies the family

    scaled(α) = (1 − α)·logits_te + α·logits_tie = TE − α·NDE + (1 − α)·Y_0,

which is logits_te at α = 0 and logits_tie at α = 1, exactly. Y_0 is one number for every class (the
counterfactual constants are scalars), so its decisions are those of TE − α·NDE. Per modality,
TE − α·NDE_k is scored as logits_te − α·nde_k (again up to that uniform shift). All of these come from
one forward pass: no model run per α. α is chosen on the validation split, never on the split reported.

Missing modalities. For each rate η and draw, every sample keeps each modality with probability 1 − η
(at least one kept; src/eval/missing.py), drawn from the seeds (MISSING_SEED, draw, rate in per mille);
each curve is the mean and std over draws, summarised by its area (trapezoid rule, AUILC).
"""
from __future__ import annotations

import numpy as np

from . import metrics
from .missing import keep_masks
from ..modalities import LETTERS, MODALITIES

ALPHA_GRID = tuple(np.round(np.arange(0, 3.0001, 0.25), 2).tolist())
RATES = tuple(np.round(np.arange(0, 0.70001, 0.1), 2).tolist())
DRAWS = 5
MISSING_SEED = 0


def scaled_logits(pred: dict, alpha: float, modality: str | None = None) -> np.ndarray:
    """TE − α·NDE (all modalities), or TE − α·NDE_k for one modality, from a predictions dict."""
    te = pred["logits_te"]
    if modality is None:
        return (1 - alpha) * te + alpha * pred["logits_tie"]
    return te - alpha * pred[f"logits_nde_{LETTERS[modality]}"]


def per_sample(pred: dict, logits: np.ndarray, task: str) -> np.ndarray:
    return metrics.headline_hits(logits, pred["target"], task, score=pred.get("score"))


def mean_on(values: np.ndarray, rows) -> float | None:
    """The mean over `rows` (all rows when None); None on an empty subset."""
    chosen = values if rows is None else values[np.asarray(rows, dtype=np.int64)]
    return float(chosen.mean()) if len(chosen) else None


def alpha_curves(pred: dict, task: str, grid=ALPHA_GRID, subsets: dict | None = None) -> dict:
    """{"all": [score per α], "text": [...], ...} on all rows, plus one curve of TE − α·NDE per subset of
    `subsets` ({name: rows}) under "subsets"."""
    per_alpha = [per_sample(pred, scaled_logits(pred, a), task) for a in grid]
    curves = {"all": [mean_on(v, None) for v in per_alpha]}
    for modality in MODALITIES:
        curves[modality] = [mean_on(per_sample(pred, scaled_logits(pred, a, modality), task), None) for a in grid]
    curves["subsets"] = {name: [mean_on(v, rows) for v in per_alpha] for name, rows in (subsets or {}).items()}
    return curves


def select_alpha(curve: list, grid=ALPHA_GRID) -> float | None:
    """The α of the best score; of equal scores the smallest α (the least change to TE)."""
    scored = [(score, -a) for a, score in zip(grid, curve) if score is not None]
    return -max(scored)[1] if scored else None


def main_predictions(pred: dict, task: str, alpha: float | None) -> dict:
    """Per-sample headline scores of m, te, tie and, with an α, tie_alpha (TE − α·NDE)."""
    scores = {name: per_sample(pred, pred[f"logits_{name}"], task)
              for name in ("m", "te", "tie") if f"logits_{name}" in pred}
    if alpha is not None and "logits_tie" in pred:
        scores["tie_alpha"] = per_sample(pred, scaled_logits(pred, alpha), task)
    return scores


def missing_masks(n: int, rate: float, draw: int, seed: int = MISSING_SEED) -> np.ndarray:
    """The keep mask of one (rate, draw): a pure function of its seeds, the same for every run scored."""
    return keep_masks(n, rate, np.random.default_rng([seed, draw, int(round(rate * 1000))]))


def auilc(rates, values) -> float | None:
    """Area under the score-vs-missing-rate curve (trapezoid rule over the rates given)."""
    if any(v is None for v in values) or len(rates) < 2:
        return None
    x, y = np.asarray(rates, dtype=np.float64), np.asarray(values, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def summarize_draws(scores: dict) -> dict:
    """{prediction: [score per draw] per rate} -> curves {prediction: {mean, std}} (lists over rates)."""
    return {name: {"mean": [float(np.mean(d)) for d in per_rate], "std": [float(np.std(d)) for d in per_rate]}
            for name, per_rate in scores.items()}

