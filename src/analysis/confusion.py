"""Confusion matrices of a split's predictions, in the units of the metrics (src/eval/metrics.py).

MOSEI / MOSI (``cls`` and ``regression``): 7 x 7 counts over the sentiment classes -3..3, both scores
clipped to [-3, 3] and rounded half to even as ``acc7`` does, so the diagonal sums to acc7 · N.
IEMOCAP (``binary``): one 2 x 2 matrix per emotion (absent, present), the diagonal of each summing
to that emotion's accuracy · N. CH-SIMS (``sims_cls`` and ``sims_regression``): 5 x 5 counts over MMSA's
acc5 bins, so the diagonal sums to acc5 · N. Rows are the true class, columns the predicted one.
"""
from __future__ import annotations

import numpy as np

from ..data.layout import SIMS_BINS, sims_bin
from ..eval.evaluate import PREDICTIONS
from ..eval.metrics import EMOTIONS, SENTIMENT_CLASSES, SIMS_CENTRES, predictions_to_scores
from .plots import plot_confusion

SENTIMENT_LABELS = [str(c) for c in range(-(SENTIMENT_CLASSES // 2), SENTIMENT_CLASSES // 2 + 1)]
SIMS_LABELS = [f"{c:+g}" for c in SIMS_CENTRES]
EMOTION_LABELS = ["absent", "present"]


def sentiment_confusion(pred_scores, truth_scores) -> np.ndarray:
    """(7, 7) counts of (true class, predicted class) of sentiment scores, classes -3..3."""
    half = SENTIMENT_CLASSES // 2
    predicted = np.round(np.clip(np.asarray(pred_scores, dtype=np.float64).reshape(-1), -half, half)).astype(int)
    truth = np.round(np.clip(np.asarray(truth_scores, dtype=np.float64).reshape(-1), -half, half)).astype(int)
    if predicted.shape != truth.shape:
        raise ValueError(f"{predicted.size} predicted scores but {truth.size} true scores")
    counts = np.zeros((SENTIMENT_CLASSES, SENTIMENT_CLASSES), dtype=np.int64)
    np.add.at(counts, (truth + half, predicted + half), 1)
    return counts


def sims_confusion(pred_scores, truth_scores) -> np.ndarray:
    """(5, 5) counts of (true bin, predicted bin) of CH-SIMS scores, MMSA's acc5 bins."""
    edges = SIMS_BINS["acc5"]
    predicted = sims_bin(np.clip(np.asarray(pred_scores, dtype=np.float64).reshape(-1), -1, 1), edges)
    truth = sims_bin(np.clip(np.asarray(truth_scores, dtype=np.float64).reshape(-1), -1, 1), edges)
    if predicted.shape != truth.shape:
        raise ValueError(f"{predicted.size} predicted scores but {truth.size} true scores")
    counts = np.zeros((len(edges) + 1, len(edges) + 1), dtype=np.int64)
    np.add.at(counts, (truth, predicted), 1)
    return counts


def emotion_confusions(logits, target) -> np.ndarray:
    """(4, 2, 2) counts per emotion of (true, predicted) absent/present, from (N, 8) logits read as
    (absent, present) pairs and a (N, 4) target (or its one-hot (N, 4, 2) layout)."""
    logits = np.asarray(logits, dtype=np.float64)
    target = np.asarray(target)
    if target.ndim == 3:
        target = target.argmax(-1)
    predicted = logits.reshape(len(logits), len(EMOTIONS), 2).argmax(-1)
    counts = np.zeros((len(EMOTIONS), 2, 2), dtype=np.int64)
    for index in range(len(EMOTIONS)):
        np.add.at(counts[index], (target[:, index].astype(int), predicted[:, index]), 1)
    return counts


def confusion_matrices(pred: dict, task: str) -> dict:
    """{prediction name: counts} for every prediction in `pred` (the output of `predict`)."""
    matrices = {}
    for name, key in PREDICTIONS.items():
        if key not in pred:
            continue
        if task == "binary":
            matrices[name] = emotion_confusions(pred[key], pred["target"])
            continue
        # The true score as compute_metrics reads it: the raw score when the data has it.
        if pred.get("score") is not None:
            truth = pred["score"]
        elif task == "cls":
            truth = np.asarray(pred["target"], dtype=np.float64) - SENTIMENT_CLASSES // 2
        elif task == "sims_cls":
            truth = np.asarray(SIMS_CENTRES)[np.asarray(pred["target"])]
        else:
            truth = pred["target"]
        confusion = sims_confusion if task.startswith("sims_") else sentiment_confusion
        matrices[name] = confusion(predictions_to_scores(pred[key], task), truth)
    return matrices


def write_confusion_png(matrices: dict, task: str, path, title: str):
    """The matrices as one PNG (percent of samples, as the tables), or None without matplotlib."""
    if task == "binary":
        return plot_confusion(matrices, path, title, EMOTION_LABELS, panel_labels=list(EMOTIONS))
    if task.startswith("sims_"):
        return plot_confusion(matrices, path, title, SIMS_LABELS, accuracy_name="acc5")
    return plot_confusion(matrices, path, title, SENTIMENT_LABELS, accuracy_name="acc7")
