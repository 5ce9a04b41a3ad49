"""Bias subsets of a split: the samples where a shortcut pays (aligned) and where it misleads (conflicting).

They never depend on the model being judged, so every run scored on the same data file and split is
scored on the same samples:

- probe: for each modality, a classifier fit on that modality alone on the *training* split (PROBE);
  a sample of the split is `aligned_<modality>` when the probe predicts its label, else
  `conflicting_<modality>`. Only training labels are seen.
- unimodal labels (CH-SIMS): `conflicting_<modality>_label` where the sample's label for that modality
  alone disagrees with its multimodal label, else `aligned_<modality>_label`; for data that has them.
- words: for data with the raw text, a word carries bias when its per-class counts over the training
  split vary (coefficient of variation, std / mean, at least WORD_CV); a sample is `conflicting_words`
  when the majority label of its bias words is not its own, `aligned_words` when it is.
- a user's file: `{name: [row, ...]}` or `{name: [id, ...]}` (splits made elsewhere).

The label of a sample is its class: IEMOCAP's four (absent, present) decisions read as one 4-bit code;
for sentiment the class of the score the headline accuracy judges (metrics.headline_classes): the
rounded score in -3..3 for MOSI/MOSEI (acc7), MMSA's acc5 bin for CH-SIMS, whether the task is the
classification or the regression one.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ..errors import UserError
from ..modalities import LABEL_KEYS, MODALITIES
from . import metrics

WORD_CV = 0.1
PROBE_C = 1.0
PROBE_MAX_ITER = 1000
# What the saved subsets record of how they were made: a change here makes other subsets.
PROCEDURE = {
    "probe": {"features": "mean and std over time steps of one modality",
              "classifier": f"StandardScaler + LogisticRegression(C={PROBE_C}, lbfgs, max_iter={PROBE_MAX_ITER})",
              "fit_on": "train"},
    "words": {"statistic": "coefficient of variation of per-class word counts over train", "threshold": WORD_CV},
}
CHUNK = 512  # samples pooled at a time: a whole MOSEI split of text features does not need to be in memory


def label_codes(targets: np.ndarray, task: str, scores=None) -> np.ndarray:
    """One integer class per sample (see the module docstring): for sentiment, the class the headline
    accuracy gives the true score (`scores` when given, else read back from the targets)."""
    targets = np.asarray(targets)
    if task == "binary":
        flat = targets.reshape(len(targets), -1)
        return (flat * 2 ** np.arange(flat.shape[1])).sum(1)
    return metrics.headline_classes(metrics.true_scores(targets, task, scores), task)


def pooled_features(dataset, modality: str) -> np.ndarray:
    """(N, 2·d): the mean and std over time of one modality's features, per sample."""
    parts = []
    for start in range(0, len(dataset), CHUNK):
        x = dataset.get_batch(np.arange(start, min(start + CHUNK, len(dataset))))[modality].double()
        parts.append(np.concatenate([x.mean(1).numpy(), x.std(1, unbiased=False).numpy()], axis=1))
    return np.concatenate(parts) if parts else np.zeros((0, 2 * dataset.dims[MODALITIES.index(modality)]))


def probe_predictions(train, target_split, modality: str) -> np.ndarray:
    """The classes a probe fit on `modality` of the training split predicts for `target_split`."""
    labels = label_codes(train.targets, train.task, train.scores)
    features = pooled_features(target_split, modality)
    if len(np.unique(labels)) < 2:  # one class in training: that is all a probe could predict
        return np.full(len(features), labels[0] if len(labels) else -1)
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=PROBE_C, max_iter=PROBE_MAX_ITER))
    probe.fit(pooled_features(train, modality), labels)
    return probe.predict(features)


def split_by(agrees: np.ndarray, name: str) -> dict:
    rows = np.arange(len(agrees))
    return {f"aligned_{name}": rows[agrees].tolist(), f"conflicting_{name}": rows[~agrees].tolist()}


def probe_subsets(train, split) -> dict:
    labels = label_codes(split.targets, split.task, split.scores)
    subsets = {}
    for modality in MODALITIES:
        subsets.update(split_by(probe_predictions(train, split, modality) == labels, modality))
    return subsets


def unimodal_subsets(split) -> dict:
    """For data with one label per modality (`dataset.unimodal_targets`, {label_t: targets, ...} by the
    batch keys of LABEL_KEYS, in the form of `dataset.targets`); else {}."""
    unimodal = getattr(split, "unimodal_targets", None)
    if not unimodal:
        return {}
    labels = label_codes(split.targets, split.task, split.scores)
    subsets = {}
    for modality in MODALITIES:
        if LABEL_KEYS[modality] in unimodal:
            codes = label_codes(unimodal[LABEL_KEYS[modality]], split.task)
            subsets.update(split_by(codes == labels, f"{modality}_label"))
    return subsets


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", str(text).lower())


def word_subsets(train, split) -> dict:
    """For data with the raw text of every sample (`dataset.raw_text`); else {}."""
    if getattr(train, "raw_text", None) is None or getattr(split, "raw_text", None) is None:
        return {}
    train_labels = label_codes(train.targets, train.task, train.scores)
    classes = np.unique(train_labels)
    counts = {}
    for text, label in zip(train.raw_text, train_labels):
        for word in set(words(text)):
            counts.setdefault(word, np.zeros(len(classes)))[np.searchsorted(classes, label)] += 1
    biased = {w: classes[c.argmax()] for w, c in counts.items() if c.mean() > 0 and c.std() / c.mean() >= WORD_CV}
    labels = label_codes(split.targets, split.task, split.scores)
    aligned, conflicting = [], []
    for row, (text, label) in enumerate(zip(split.raw_text, labels)):
        votes = [biased[w] for w in words(text) if w in biased]
        if votes:
            values, number = np.unique(votes, return_counts=True)
            (aligned if values[number.argmax()] == label else conflicting).append(row)
    return {"aligned_words": aligned, "conflicting_words": conflicting}


def file_subsets(path, split) -> dict:
    """A user's subsets of `split`: JSON {name: [row indices]} or {name: [sample ids]}."""
    path = Path(path)
    try:
        given = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"--subsets {path}: cannot read it as JSON ({err}); expected {{name: [row, ...]}} or "
                        "{name: [id, ...]}") from None
    if not isinstance(given, dict) or not all(isinstance(v, list) for v in given.values()):
        raise UserError(f"--subsets {path} must hold one JSON object {{name: [row, ...] or [id, ...]}}")
    position = {sample_id: row for row, sample_id in enumerate(split.ids or [])}
    subsets = {}
    for name, members in given.items():
        if all(isinstance(m, int) and not isinstance(m, bool) for m in members):
            bad = [m for m in members if not 0 <= m < len(split)]
            if bad:
                raise UserError(f"--subsets {path}: subset '{name}' names rows {bad[:5]} outside the {split.split} "
                                f"split's 0..{len(split) - 1}; was it made for another split or file?")
            subsets[name] = sorted(set(members))
        elif all(isinstance(m, str) for m in members):
            unknown = [m for m in members if m not in position]
            if unknown:
                where = "has no sample ids" if split.ids is None else "has no samples with ids"
                raise UserError(f"--subsets {path}: subset '{name}' names ids the {split.split} split {where} "
                                f"{unknown[:5]}; was it made for another split or file?")
            subsets[name] = sorted({position[m] for m in members})
        else:
            raise UserError(f"--subsets {path}: subset '{name}' must be a list of row indices or of sample ids")
    return subsets


def bias_subsets(train, split, subsets_file=None) -> dict:
    """Every subset of `split` (rows, sorted) by name, for the data the datasets hold."""
    subsets = {**probe_subsets(train, split), **unimodal_subsets(split), **word_subsets(train, split)}
    if subsets_file is not None:
        subsets.update(file_subsets(subsets_file, split))
    return subsets


def subsets_record(subsets: dict, split) -> dict:
    """What is saved beside the results: the procedure, the data file, and each subset's rows and ids."""
    ids = split.ids
    return {"procedure": PROCEDURE, "data": split.source, "split": split.split,
            "subsets": {name: {"rows": rows, "ids": [ids[r] for r in rows] if ids is not None else None}
                        for name, rows in subsets.items()}}
