"""The two file layouts a data pickle may have, checked and read into one internal form.

MulT's pickles: {split: {text, audio, vision: (N, L, d) float; labels: (N, 4, 2) or (N, 1, 1); id?}}.
MMSA's feature pickles (MOSI, MOSEI, CH-SIMS and the OOD sets published in their layout):
{split: {text, audio, vision: (N, L, d) float; regression_labels: (N,); regression_labels_T/_A/_V:
(N,) (SIMS only); audio_lengths, vision_lengths: N ints (unaligned files); id, raw_text, annotations:
N str; text_bert, classification_labels: not used here}}.

Which one a file is comes from its keys: `labels` (MulT) or `regression_labels` (MMSA). Either way a
split becomes the same internal arrays, so both layouts share the cache and the Dataset:

    text, audio, vision   (N, L_m, d_m)     as in the file
    labels                (N, 4, 2) | (N, 1, 1)   MMSA's regression_labels as (N, 1, 1)
    id                    (N,) or (N, k)    optional
    raw_text              (N,) str          optional (MMSA's files hold it): the words, for the word subsets
    label_t/_a/_v         (N, 1, 1)         SIMS's per-modality labels (regression_labels_T/_A/_V)

A file may hold any splits (train, valid, test, test_iid, test_ood, ...); a file that is one split's
dict itself (one pickle per split) is that split, named after the file (`test_iid.pkl` -> test_iid).
Feature sizes and sequence lengths are the file's own; every split must share them. Only shapes,
types and the small integer/label arrays are looked at here; feature values are checked while the
cache is written.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..modalities import LABEL_KEYS, LETTERS
from .layout import FORMAT_LABEL_KEYS, ID_KEY, MODALITIES, RAW_TEXT_KEY, DatasetSpec

# Batch key of a modality's own label -> its key in an MMSA file (label_t -> regression_labels_T, ...).
UNIMODAL_KEYS = {LABEL_KEYS[m]: f"regression_labels_{LETTERS[m].upper()}" for m in MODALITIES}
LENGTH_KEYS = {"audio": "audio_lengths", "vision": "vision_lengths"}
# A split's name becomes part of the cache's file names, so it is kept to what any file system takes.
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass
class FileLayout:
    """What check_layout found: the format, the splits in file order, and the shared sizes."""

    format: str
    splits: dict                          # split name -> the file's dict for that split
    seq_lens: tuple[int, int, int]
    dims: tuple[int, int, int]


def where(path: Path, split: str, key: str | None = None) -> str:
    return f"{path}, split '{split}'" + (f", key '{key}'" if key is not None else "")


def _keys(mapping: dict) -> str:
    return ", ".join(repr(k) for k in mapping) or "nothing"


def _is_split(value) -> bool:
    return isinstance(value, dict) and any(key in value for key in FORMAT_LABEL_KEYS.values())


def detect_format(data, path: Path, insist: str | None = None) -> tuple[str, dict]:
    """(format, {split: dict}) of an unpickled file; `insist` ('mult' | 'mmsa') refuses the other."""
    if not isinstance(data, dict):
        raise DataError(f"{path} does not hold a data file's layout: expected a dict of splits (train, valid, "
                        f"test, ...), found a {type(data).__name__}")
    splits = {Path(path).stem: data} if _is_split(data) else data
    if not splits:
        raise DataError(f"{path} holds no splits")
    found = set()
    for split, part in splits.items():
        if not isinstance(split, str) or not SPLIT_NAME.fullmatch(split):
            raise DataError(f"{path}: split name {split!r} is not usable; a split is named by letters, digits, "
                            "'_', '-' and '.' (at most 64, e.g. test_ood)")
        if not isinstance(part, dict):
            raise DataError(f"{where(path, split)}: expected a dict of arrays, found a {type(part).__name__}")
        kinds = [fmt for fmt, key in FORMAT_LABEL_KEYS.items() if key in part]
        if len(kinds) != 1:
            raise DataError(
                f"{where(path, split)}: " + ("no label key" if not kinds else "both label keys") + f" (the split has: "
                f"{_keys(part)}); a MulT file's splits hold 'labels', an MMSA file's 'regression_labels'")
        found.add(kinds[0])
    if len(found) > 1:
        raise DataError(f"{path} mixes MulT splits (key 'labels') and MMSA splits (key 'regression_labels')")
    fmt = found.pop()
    if insist is not None and insist != fmt:
        raise DataError(f"{path} is {fmt.upper()}-format (its splits hold '{FORMAT_LABEL_KEYS[fmt]}'), but "
                        f"--data-format {insist} insists on {insist.upper()} (key '{FORMAT_LABEL_KEYS[insist]}')")
    return fmt, splits


def check_layout(data, spec: DatasetSpec, path: Path, insist: str | None = None) -> FileLayout:
    """Check keys, types, ranks and sizes of every split; return the file's layout."""
    fmt, splits = detect_format(data, path, insist)
    if fmt not in spec.formats:
        raise DataError(f"{path} is an {fmt.upper()} file, but dataset '{spec.name}' comes only as "
                        f"{', '.join(f.upper() for f in spec.formats)} files. Is '{spec.name}' the right dataset?")
    shapes: dict[str, tuple[int, int, str]] = {}
    for split, part in splits.items():
        counts = {}
        for modality in MODALITIES:
            array = _array(part, modality, path, split, fmt)
            if array.ndim != 3:
                raise DataError(f"{where(path, split, modality)}: expected a 3-D array (N, L, d) of per-step "
                                f"features, found shape {tuple(array.shape)}")
            n, length, dim = (int(x) for x in array.shape)
            if length == 0 or dim == 0:
                raise DataError(f"{where(path, split, modality)}: sequences of length {length} with {dim} features "
                                f"(shape {tuple(array.shape)}); every sample needs at least one step of {modality} "
                                "features")
            if modality in shapes and shapes[modality][:2] != (length, dim):
                first_length, first_dim, first_split = shapes[modality]
                raise DataError(f"{where(path, split, modality)}: (L, d) = ({length}, {dim}) differs from the "
                                f"({first_length}, {first_dim}) of split '{first_split}'; all splits of a file "
                                "share one sequence length and feature size per modality")
            shapes.setdefault(modality, (length, dim, split))
            counts[modality] = n
        if fmt == "mult":
            labels = _array(part, "labels", path, split, fmt)
            if labels.ndim != 3 or tuple(labels.shape[1:]) != spec.label_shape:
                raise DataError(f"{where(path, split, 'labels')}: {spec.name} labels must have shape "
                                f"{describe_labels(spec)}; found shape {tuple(labels.shape)}. Is '{spec.name}' the "
                                "right dataset for this file?")
            counts["labels"] = int(labels.shape[0])
        else:
            for key in ("regression_labels",) + (tuple(UNIMODAL_KEYS.values()) if spec.unimodal_labels else ()):
                counts[key] = _scores(part, key, path, split).shape[0]
            for modality, key in LENGTH_KEYS.items():
                if key in part:
                    counts[key] = _check_lengths(part[key], shapes[modality][0], path, split, key)
        if ID_KEY in part:
            counts[ID_KEY] = _count_ids(part[ID_KEY], path, split)
        if RAW_TEXT_KEY in part:
            counts[RAW_TEXT_KEY] = _count_texts(part[RAW_TEXT_KEY], path, split)
        if len(set(counts.values())) != 1:
            listing = ", ".join(f"{key} {n}" for key, n in counts.items())
            raise DataError(f"{where(path, split)}: the arrays disagree on the number of samples ({listing}); they "
                            "must all have the same first dimension N")
        if counts["text"] == 0:
            raise DataError(f"{where(path, split)}: the split has no samples")
    return FileLayout(fmt, splits, tuple(shapes[m][0] for m in MODALITIES), tuple(shapes[m][1] for m in MODALITIES))


def describe_labels(spec: DatasetSpec) -> str:
    if spec.label_shape == (4, 2):
        return ("(N, 4, 2): one one-hot (absent, present) pair for each of the 4 emotions "
                "Neutral, Happy, Sad, Angry")
    return f"(N, 1, 1): one sentiment score in [-{spec.score_range:g}, {spec.score_range:g}] per sample"


def _array(part: dict, key: str, path: Path, split: str, fmt: str) -> np.ndarray:
    if key not in part:
        needed = ", ".join(MODALITIES + (FORMAT_LABEL_KEYS[fmt],))
        raise DataError(f"{where(path, split)}: key '{key}' is missing (the split has: {_keys(part)}); every "
                        f"split of a {fmt.upper()} file needs {needed}")
    array = part[key]
    if not isinstance(array, np.ndarray):
        raise DataError(f"{where(path, split, key)}: expected a numpy array, found a {type(array).__name__}")
    if array.dtype.kind not in "biuf":
        raise DataError(f"{where(path, split, key)}: expected real numbers, found an array of dtype {array.dtype}")
    return array


def _scores(part: dict, key: str, path: Path, split: str) -> np.ndarray:
    """An MMSA label array: (N,) or (N, 1) real numbers."""
    if key not in part:
        raise DataError(f"{where(path, split)}: key '{key}' is missing (the split has: {_keys(part)})"
                        + ("; CH-SIMS files hold a label per modality (regression_labels_T, _A, _V)"
                           if key in UNIMODAL_KEYS.values() else ""))
    array = _array(part, key, path, split, "mmsa")
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise DataError(f"{where(path, split, key)}: expected one score per sample, shape (N,), found "
                        f"{tuple(array.shape)}")
    return array


def _check_lengths(lengths, max_length: int, path: Path, split: str, key: str) -> int:
    """Valid frames per sample: N integers in [0, L] of the modality's array; returns N."""
    values = np.asarray(lengths) if isinstance(lengths, (list, tuple, np.ndarray)) else None
    if values is None or values.ndim != 1 or (values.size and values.dtype.kind not in "iub"):
        raise DataError(f"{where(path, split, key)}: expected N integers (a list or 1-D array), found "
                        f"{type(lengths).__name__} {getattr(values, 'dtype', '')} {getattr(values, 'shape', '')}")
    if values.size and (values.min() < 0 or values.max() > max_length):
        bad = int(((values < 0) | (values > max_length)).sum())
        raise DataError(f"{where(path, split, key)}: {bad} lengths lie outside 0..{max_length}, the array's "
                        f"sequence length (largest {int(values.max())}, smallest {int(values.min())})")
    return int(values.size)


def _count_ids(ids, path: Path, split: str) -> int:
    if isinstance(ids, (list, tuple)):
        ids = np.asarray(ids, dtype=object)
    if not isinstance(ids, np.ndarray) or ids.ndim not in (1, 2):
        raise DataError(f"{where(path, split, ID_KEY)}: expected a 1-D or 2-D array (or list) of sample ids, found "
                        f"{type(ids).__name__} {getattr(ids, 'shape', '')}")
    if ids.dtype == object and not all(isinstance(v, (str, bytes)) for v in ids.reshape(-1).tolist()):
        raise DataError(f"{where(path, split, ID_KEY)}: sample ids must be strings")
    return int(ids.shape[0])


def _count_texts(texts, path: Path, split: str) -> int:
    """The raw text: one string per sample, as a list or a 1-D array of str (or bytes, read as UTF-8)."""
    if isinstance(texts, (list, tuple)):
        texts = np.asarray(texts, dtype=object)
    if not isinstance(texts, np.ndarray) or texts.ndim != 1:
        raise DataError(f"{where(path, split, RAW_TEXT_KEY)}: expected the words of each sample, a list or 1-D array "
                        f"of N strings, found {type(texts).__name__} {getattr(texts, 'shape', '')}")
    if texts.dtype.kind not in "US" and not (
            texts.dtype == object and all(isinstance(v, (str, bytes)) for v in texts.tolist())):
        raise DataError(f"{where(path, split, RAW_TEXT_KEY)}: every entry must be a string (the words of one "
                        f"sample); found an array of dtype {texts.dtype} with other values")
    return int(texts.shape[0])


def internal_arrays(part: dict, fmt: str, spec: DatasetSpec):
    """Yield (internal key, array) of one checked split, popping each from `part` so it can be freed."""
    for modality in MODALITIES:
        yield modality, part.pop(modality)
    if fmt == "mult":
        yield "labels", part.pop("labels")
    else:
        yield "labels", _as_label_layout(part.pop("regression_labels"))
        if spec.unimodal_labels:
            for key, source in UNIMODAL_KEYS.items():
                yield key, _as_label_layout(part.pop(source))


def _as_label_layout(scores: np.ndarray) -> np.ndarray:
    # MMSA's (N,) scores in MulT's (N, 1, 1) layout: one label convention downstream.
    return np.asarray(scores).reshape(-1, 1, 1)


def strings_of(part: dict, key: str):
    """Pop the checked per-sample strings `key` (ids or raw text) of a split: an array, or None."""
    values = part.pop(key, None)
    return None if values is None else np.asarray(values, dtype=object) if isinstance(values, (list, tuple)) else values

