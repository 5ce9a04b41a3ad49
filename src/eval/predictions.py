"""Per-sample predictions: every output a model gives for every sample of a split, in one .npz file.

`eval --save-predictions` writes `<run>/predictions_<split>.npz` (an evaluation of another checkpoint or
other data: `predictions_<tag>_<split>.npz`, named like its eval_*.json). Its arrays:

    index          (N,)    the row of each sample in the split
    id             (N,)    the data file's sample ids, where the file has them
    target         (N, ...) the dataset's targets; score (N,) the raw sentiment score (MOSEI/MOSI)
    logits_<key>   (N, C)  every prediction the model returns: tie, te, m, the branches t, a, v, and the
                           causal head's effects te_effect (TE), nde, nde_t, nde_a, nde_v; a backbone
                           alone has only logits_m

The file alone recomputes every metric of the evaluation (`score_file`): nothing else is needed to
compare runs sample by sample, bootstrap their differences or build new subsets.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from ..atomic import write_bytes
from ..errors import UserError
from .evaluate import PREDICTIONS, predict
from . import metrics

# File key -> the model output it holds. The prediction keys come first, in evaluate.PREDICTIONS' order.
OUTPUTS = {**PREDICTIONS, "t": "logits_t", "a": "logits_a", "v": "logits_v",
           "te_effect": "te", "nde": "nde", "nde_t": "nde_t", "nde_a": "nde_a", "nde_v": "nde_v"}


def predict_all(model, dataset, batch_size: int, ctx, amp: bool = False, remove=(), keep=None) -> dict:
    """Every output of OUTPUTS the model returns, for every sample, under the file's keys
    (`logits_<key>`), plus target, score (when the data has it) and loss."""
    raw = predict(model, dataset, batch_size, ctx, remove=remove, amp=amp, keys=tuple(OUTPUTS.values()), keep=keep)
    pred = {f"logits_{key}": raw[output] for key, output in OUTPUTS.items() if output in raw}
    pred.update({key: raw[key] for key in ("target", "score", "loss") if key in raw})
    return pred


def prediction_file(run_dir: Path, tag: str, own: bool, split: str, suffix: str = "") -> Path:
    """Where an evaluation's predictions go: the run's own best_acc on its own data is the plain name."""
    return Path(run_dir) / (f"predictions_{split}{suffix}.npz" if own else f"predictions_{tag}_{split}{suffix}.npz")


def write_predictions(path: Path, pred: dict, dataset) -> Path:
    """The .npz of module docstring, written atomically."""
    arrays = {"index": np.arange(len(dataset)), "target": pred["target"]}
    if dataset.ids is not None:
        arrays["id"] = np.asarray(dataset.ids, dtype=str)
    if "score" in pred:
        arrays["score"] = pred["score"]
    arrays.update({key: value for key, value in pred.items() if key.startswith("logits_")})
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_bytes(path, buffer.getvalue())
    return path


def read_predictions(path: Path) -> dict:
    """The arrays of a predictions file (never pickled objects)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the predictions file {path}: {err}") from None


def score_file(pred: dict, task: str, rows=None) -> dict:
    """{prediction: metrics} of the predictions tie, te and m a file holds, on `rows` (default all)."""
    rows = slice(None) if rows is None else np.asarray(rows)
    score = pred["score"][rows] if "score" in pred else None
    return {name: metrics.compute_metrics(pred[f"logits_{name}"][rows], pred["target"][rows], task, score=score)
            for name in PREDICTIONS if f"logits_{name}" in pred}
