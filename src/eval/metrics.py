"""Evaluation metrics (docs/design.md § Metrics), computed from numpy arrays (torch tensors are accepted
and copied to numpy).

IEMOCAP (task ``binary``): four binary tasks, one per emotion in the order Neutral, Happy, Sad, Angry.
The model's 8 logits are read as (4, 2) (absent, present) pairs; each emotion's prediction is the
argmax of its pair. Reported per emotion: accuracy and weighted F1; overall: ``avg_acc`` (the headline,
the paper's 83.4% with MulT) and ``avg_f1``.

CMU-MOSEI / CMU-MOSI (tasks ``cls`` and ``regression``): metrics on sentiment scores in [-3, 3]. A
``cls`` model's score is its argmax class minus 3; a ``regression`` model's score is its single output.

- ``acc7``: clip both scores to [-3, 3], round to integers, compare (7 classes);
- ``acc5``: the same with [-2, 2] (5 classes);
- ``acc2_nonneg``, ``f1_nonneg_*``: negative (< 0) vs non-negative (>= 0), over all samples;
- ``acc2_pos``, ``f1_pos_*``: negative (< 0) vs positive (> 0), samples whose true score is exactly 0
  excluded (the reading used by MulT's published evaluation);
- F1 in two variants: ``*_binary`` (F1 of the non-negative / positive class) and ``*_weighted``
  (support-weighted mean of both classes' F1, which is what MulT's evaluation prints);
- ``mae``: mean absolute error of the unclipped scores; ``corr``: Pearson correlation.

Rounding is numpy's (half to even), as in the reference evaluation, so that 0.5 rounds to 0 and 1.5 to 2.

CH-SIMS (tasks ``sims_cls`` and ``sims_regression``), MMSA's definitions for scores in [-1, 1]: both
scores clipped to [-1, 1], then binned with upper bounds included (the lowest bin takes -1 too):
- ``acc2``: [-1, 0] vs (0, 1]; ``f1``: support-weighted F1 of those two classes;
- ``acc3``: [-1, -0.1], (-0.1, 0.1], (0.1, 1];
- ``acc5``: [-1, -0.7], (-0.7, -0.1], (-0.1, 0.1], (0.1, 0.7], (0.7, 1];
- ``mae`` of the clipped scores; ``corr``: Pearson correlation.
A ``sims_cls`` model predicts one of the five acc5 bins; its score is the bin's centre (SIMS_CENTRES), so
acc5 and acc3 are exact, and the middle bin counts as [-1, 0] for acc2.

Edge cases, chosen so that a metrics dict never needs special handling downstream:
- ``corr`` is 0.0 when either side is constant (or there are fewer than two samples): a constant
  prediction carries no linear information about the truth, and 0.0 keeps multi-seed means finite where
  numpy would return nan with a warning.
- ``acc2_pos`` and ``f1_pos_*`` are nan when every true score is 0 (nothing is left to evaluate).
- F1 is 0.0, not a warning, when a class is never predicted (scikit-learn's ``zero_division=0``).
"""
from __future__ import annotations

import math

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from ..data.layout import SIMS_BINS, sims_bin

EMOTIONS = ("neutral", "happy", "sad", "angry")
TASKS = ("binary", "cls", "regression", "sims_cls", "sims_regression")
# Number of sentiment classes of the ``cls`` task: scores -3..3.
SENTIMENT_CLASSES = 7
# CH-SIMS: the score a sims_cls class (an acc5 bin of SIMS_BINS) stands for.
SIMS_CENTRES = (-0.85, -0.4, 0.0, 0.4, 0.85)


def _as_numpy(values) -> np.ndarray:
    """A numpy copy of a numpy array, list or torch tensor (detached and moved to the CPU first)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")


# ----------------------------------------------------------------------------------------------------
# IEMOCAP


def iemocap_metrics(logits, target) -> dict[str, float]:
    """Per-emotion accuracy and weighted F1, plus their averages over the four emotions.

    ``logits``: (N, 8), read as (N, 4, 2) (absent, present) pairs in the order Neutral, Happy, Sad,
    Angry. ``target``: (N, 4) in {0, 1} (1 = present); the one-hot (N, 4, 2) label layout of the data
    files is accepted too and reduced by argmax.

    Returns keys ``neutral_acc``, ``neutral_f1``, ... , ``angry_f1``, ``avg_acc`` and ``avg_f1``.
    """
    logits = _as_numpy(logits).astype(np.float64)
    target = _as_numpy(target)
    n_emotions = len(EMOTIONS)
    if target.ndim == 3:
        target = target.argmax(-1)
    if logits.ndim != 2 or logits.shape[1] != 2 * n_emotions:
        raise ValueError(f"IEMOCAP logits must be (N, {2 * n_emotions}), got {logits.shape}")
    if target.shape != (logits.shape[0], n_emotions):
        raise ValueError(f"IEMOCAP target must be (N, {n_emotions}) matching logits {logits.shape}, got {target.shape}")
    if logits.shape[0] == 0:
        raise ValueError("cannot compute metrics on zero samples")

    predicted = logits.reshape(-1, n_emotions, 2).argmax(-1)
    result: dict[str, float] = {}
    for index, emotion in enumerate(EMOTIONS):
        truth, guess = target[:, index].astype(np.int64), predicted[:, index]
        result[f"{emotion}_acc"] = float(accuracy_score(truth, guess))
        result[f"{emotion}_f1"] = float(f1_score(truth, guess, average="weighted", zero_division=0))
    result["avg_acc"] = float(np.mean([result[f"{e}_acc"] for e in EMOTIONS]))
    result["avg_f1"] = float(np.mean([result[f"{e}_f1"] for e in EMOTIONS]))
    return result


# ----------------------------------------------------------------------------------------------------
# Sentiment (MOSEI / MOSI)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation, 0.0 when it is undefined (a constant side or fewer than two samples)."""
    if x.size < 2:
        return 0.0
    x_centred, y_centred = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(np.dot(x_centred, x_centred)) * float(np.dot(y_centred, y_centred)))
    if denominator == 0.0 or not math.isfinite(denominator):
        return 0.0
    # Clip guards against |r| creeping past 1 by rounding.
    return float(np.clip(np.dot(x_centred, y_centred) / denominator, -1.0, 1.0))


def _binary_scores(truth: np.ndarray, predicted: np.ndarray, prefix_acc: str, prefix_f1: str) -> dict[str, float]:
    if truth.size == 0:
        nan = float("nan")
        return {prefix_acc: nan, f"{prefix_f1}_binary": nan, f"{prefix_f1}_weighted": nan}
    return {
        prefix_acc: float(accuracy_score(truth, predicted)),
        f"{prefix_f1}_binary": float(f1_score(truth, predicted, average="binary", zero_division=0)),
        f"{prefix_f1}_weighted": float(f1_score(truth, predicted, average="weighted", zero_division=0)),
    }


def _score_pair(pred_scores, truth_scores) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true scores as flat float64 arrays of one size, checked finite and non-empty."""
    predicted = _as_numpy(pred_scores).astype(np.float64).reshape(-1)
    truth = _as_numpy(truth_scores).astype(np.float64).reshape(-1)
    if predicted.shape != truth.shape:
        raise ValueError(f"{predicted.size} predicted scores but {truth.size} true scores")
    if predicted.size == 0:
        raise ValueError("cannot compute metrics on zero samples")
    if not (np.isfinite(predicted).all() and np.isfinite(truth).all()):
        raise ValueError("sentiment scores contain nan or inf")
    return predicted, truth


def sentiment_metrics(pred_scores, truth_scores) -> dict[str, float]:
    """Acc7, Acc5, the two Acc2/F1 readings, MAE and Pearson correlation of sentiment scores.

    ``pred_scores`` and ``truth_scores``: (N,) scores (any shape with N elements is flattened).
    See the module docstring for each key's definition and the edge cases.
    """
    predicted, truth = _score_pair(pred_scores, truth_scores)
    result = {
        "acc7": float(np.mean(np.round(np.clip(predicted, -3, 3)) == np.round(np.clip(truth, -3, 3)))),
        "acc5": float(np.mean(np.round(np.clip(predicted, -2, 2)) == np.round(np.clip(truth, -2, 2)))),
    }
    result.update(_binary_scores(truth >= 0, predicted >= 0, "acc2_nonneg", "f1_nonneg"))
    nonzero = truth != 0
    result.update(_binary_scores(truth[nonzero] > 0, predicted[nonzero] > 0, "acc2_pos", "f1_pos"))
    result["mae"] = float(np.mean(np.abs(predicted - truth)))
    result["corr"] = _pearson(predicted, truth)
    return result


def sims_metrics(pred_scores, truth_scores) -> dict[str, float]:
    """MMSA's CH-SIMS metrics (see the module docstring) of (N,) scores in [-1, 1]."""
    predicted, truth = (np.clip(scores, -1.0, 1.0) for scores in _score_pair(pred_scores, truth_scores))
    bins = {name: (sims_bin(predicted, edges), sims_bin(truth, edges)) for name, edges in SIMS_BINS.items()}
    result = {name: float(np.mean(p == t)) for name, (p, t) in bins.items()}
    result["f1"] = float(f1_score(bins["acc2"][1], bins["acc2"][0], average="weighted", zero_division=0))
    result["mae"] = float(np.mean(np.abs(predicted - truth)))
    result["corr"] = _pearson(predicted, truth)
    return result


def predictions_to_scores(logits, task: str) -> np.ndarray:
    """Sentiment scores (N,) from model outputs: argmax - 3 for ``cls`` (C = 7), the bin's centre for
    ``sims_cls`` (C = 5), the output for the regression tasks."""
    _check_task(task)
    logits = _as_numpy(logits)
    if task == "cls":
        if logits.ndim != 2 or logits.shape[1] != SENTIMENT_CLASSES:
            raise ValueError(f"cls logits must be (N, {SENTIMENT_CLASSES}), got {logits.shape}")
        return logits.argmax(-1).astype(np.float64) - (SENTIMENT_CLASSES // 2)
    if task == "sims_cls":
        if logits.ndim != 2 or logits.shape[1] != len(SIMS_CENTRES):
            raise ValueError(f"sims_cls logits must be (N, {len(SIMS_CENTRES)}), got {logits.shape}")
        return np.asarray(SIMS_CENTRES)[logits.argmax(-1)]
    if task in ("regression", "sims_regression"):
        if logits.ndim not in (1, 2) or (logits.ndim == 2 and logits.shape[1] != 1):
            raise ValueError(f"regression outputs must be (N,) or (N, 1), got {logits.shape}")
        return logits.reshape(-1).astype(np.float64)
    raise ValueError("IEMOCAP ('binary') outputs are four emotion decisions, not a sentiment score")


def compute_metrics(logits, target, task: str, score=None) -> dict[str, float]:
    """All metrics of a task from model outputs and the dataset's targets.

    ``task`` is the dataset's task: ``binary`` (IEMOCAP, ``target`` (N, 4)), ``cls`` (``target`` the
    class index score + 3) or ``regression`` (``target`` the score). For the sentiment tasks pass the
    dataset's raw ``score`` when available: a ``cls`` target is already rounded, so without it the
    true score is reconstructed as target - 3 and ``acc2_pos`` loses the samples in (-0.5, 0.5)
    that are not exactly 0.
    """
    _check_task(task)
    if task == "binary":
        return iemocap_metrics(logits, target)
    predicted, truth = predictions_to_scores(logits, task), true_scores(target, task, score)
    if task.startswith("sims_"):
        return sims_metrics(predicted, truth)
    return sentiment_metrics(predicted, truth)


def true_scores(target, task: str, score=None) -> np.ndarray:
    """The true sentiment scores: the raw `score` when given, else reconstructed from the target."""
    if score is not None:
        return _as_numpy(score).astype(np.float64).reshape(-1)
    if task == "cls":
        return _as_numpy(target).astype(np.float64).reshape(-1) - (SENTIMENT_CLASSES // 2)
    if task == "sims_cls":
        return np.asarray(SIMS_CENTRES)[_as_numpy(target).reshape(-1)]
    return _as_numpy(target).astype(np.float64).reshape(-1)


def headline(task: str) -> tuple[str, bool]:
    """The metric a task is judged by, and whether higher is better.

    IEMOCAP: ``avg_acc`` (average accuracy over the four emotions, the paper's 83.4% with MulT).
    MOSEI / MOSI, both tasks: ``acc7``. The paper does not name the metric of its MOSEI numbers
    (50.1% MulT, 48.8% PMR, 48.8% DMD); their magnitude matches 7-class accuracy, not Acc2 or F1, so
    Acc7 is the most likely reading and the one compared against.
    CH-SIMS, both tasks: ``acc5``, its finest-grained accuracy (as Acc7 is MOSEI's and MOSI's).
    """
    _check_task(task)
    if task == "binary":
        return "avg_acc", True
    return ("acc5", True) if task.startswith("sims_") else ("acc7", True)


# The columns of the table a paper prints (compare, summarize), the headline first: IEMOCAP's two
# averages; for sentiment the figures MulT's evaluation prints (Acc7, Acc2 and weighted F1 without the
# zero-score samples, MAE, correlation).
PAPER_METRICS = {"binary": ("avg_acc", "avg_f1"),
                 "cls": ("acc7", "acc2_pos", "f1_pos_weighted", "mae", "corr"),
                 "regression": ("acc7", "acc2_pos", "f1_pos_weighted", "mae", "corr")}


def headline_hits(logits, target, task: str, score=None) -> np.ndarray:
    """(N,) per-sample share of the headline metric: its mean over the samples is the headline.

    IEMOCAP: the fraction of the four emotion decisions a sample gets right (mean: ``avg_acc``);
    MOSEI / MOSI: 1 where the 7-class score is right (mean: ``acc7``); CH-SIMS: 1 where the acc5 bin is
    right (mean: ``acc5``). Arguments as in compute_metrics.
    A paired bootstrap (src/eval/stats.py) resamples these.
    """
    _check_task(task)
    if task == "binary":
        target = _as_numpy(target)
        if target.ndim == 3:
            target = target.argmax(-1)
        predicted = _as_numpy(logits).reshape(len(target), len(EMOTIONS), 2).argmax(-1)
        return (predicted == target).mean(axis=1).astype(np.float64)
    predicted, truth = predictions_to_scores(logits, task), true_scores(target, task, score)
    return (headline_classes(predicted, task) == headline_classes(truth, task)).astype(np.float64)


def headline_classes(scores, task: str) -> np.ndarray:
    """(N,) int64: the class the headline accuracy puts each sentiment score in: CH-SIMS's acc5 bin (0..4,
    of the score clipped to [-1, 1]), else the 7-class score (-3..3, rounded half to even after clipping)."""
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if task.startswith("sims_"):
        return sims_bin(np.clip(scores, -1, 1), SIMS_BINS["acc5"]).astype(np.int64)
    return np.round(np.clip(scores, -3, 3)).astype(np.int64)


# ----------------------------------------------------------------------------------------------------
# Presentation

# Every result file (metrics.json, eval_*.json, analysis.json) stores accuracies and F1 as fractions, the
# unit the computation gives; every table, chart and log line shows them in percent. The files say so.
STORED_UNITS = "accuracies and F1 are fractions (0.834 = 83.4%); MAE and corr in their own units"


def is_fraction_metric(key: str) -> bool:
    """Whether a metric is a proportion shown as a percentage (accuracies and F1 scores)."""
    name = key.rsplit("/", 1)[-1].lower()
    return "acc" in name or "f1" in name


def format_value(key: str, value: float) -> str:
    """A metric for display: accuracies and F1 as percentages to 1 decimal, anything else to 3 decimals."""
    if value is None:
        return "-"
    value = float(value)
    if math.isnan(value):
        return "nan"
    if is_fraction_metric(key):
        return f"{100.0 * value:.1f}"
    return f"{value:.3f}"


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A fixed-width table: one column per prediction, one row per metric.

    ``results`` maps a column label (e.g. ``"tie (debiased)"``, ``"te (fused)"``, ``"m (backbone)"``)
    to that prediction's metrics dict. Rows follow the order in which metrics first appear; a metric a
    column lacks shows as ``-``. Accuracies and F1 are percentages (1 decimal), MAE and corr 3 decimals.
    """
    columns = list(results)
    metrics: list[str] = []
    for values in results.values():
        metrics.extend(key for key in values if key not in metrics)
    if not columns or not metrics:
        return "(no metrics)"

    header = ["metric", *columns]
    body = [[key, *(format_value(key, results[column].get(key)) for column in columns)] for key in metrics]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def render(row: list[str]) -> str:
        # Metric names left-aligned, numbers right-aligned so decimal points line up.
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([render(header), rule, *(render(row) for row in body)])
