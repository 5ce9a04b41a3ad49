"""The Dataset the training loop sees: memory-mapped float32 features plus in-memory targets.

Items and batches are dicts of tensors (docs/architecture.md, Data):

    text (L_t, d_t) float32, audio (L_a, d_a) float32, vision (L_v, d_v) float32,
    target: iemocap (4,) int64 | cls, sims_cls () int64 | regression, sims_regression () float32,
    score () float32 (sentiment datasets only: the raw sentiment score, for metrics),
    label_t, label_a, label_v: each modality's own target, in the form of `target` (files with a label
        per modality only: CH-SIMS's regression_labels_T/_A/_V).

The sizes (d_m, L_m) are the file's own: MulT's GloVe-300 text and an MMSA file's BERT-768 text both load.

Batching without a collate step: `dataset.get_batch(indices)` (or `dataset[indices]` with a list,
array or tensor of indices) gathers a whole batch with one sorted fancy-index read per modality and
returns the stacked dict directly, which is much cheaper than building and stacking one item at a
time. Two ways to use it:

    for batch in train.iter_batches(32, shuffle=True, generator=g): ...

    # or with a DataLoader (e.g. for worker processes): let the sampler produce whole batches and
    # turn off the loader's own batching, so each index it passes is a list
    DataLoader(train, sampler=BatchSampler(RandomSampler(train), 32, drop_last=False), batch_size=None)
"""
from __future__ import annotations

from numbers import Integral
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import CachedData, prepare_cache
from .formats import UNIMODAL_KEYS
from .layout import (ID_KEY, MODALITIES, RAW_TEXT_KEY, SIMS_BINS, check_format, sims_bin, get_spec, output_dim,
                     require_data_file, resolve_task)
from ..errors import DataError



def targets_from_labels(labels: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray | None]:
    """(targets, scores) from raw labels: IEMOCAP (N, 4, 2) pairs or sentiment (N, 1, 1) scores.

    - binary: argmax of each (absent, present) pair -> (N, 4) int64; no scores.
    - cls: round(clip(score, -3, 3)) + 3 -> (N,) int64 in 0..6. Rounding is half-to-even, as
      numpy's and torch's round are (so 2.5 -> 2, 1.5 -> 2).
    - sims_cls: the MMSA Acc5 bin the score falls in -> (N,) int64 in 0..4: [-1, -0.7], (-0.7, -0.1],
      (-0.1, 0.1], (0.1, 0.7], (0.7, 1].
    - regression, sims_regression: the score itself, (N,) float32.
    """
    labels = np.asarray(labels)
    if task == "binary":
        return labels.argmax(-1).astype(np.int64), None
    scores = labels[:, 0, 0].astype(np.float32)
    if task == "cls":
        return (np.round(np.clip(scores, -3.0, 3.0)) + 3).astype(np.int64), scores
    if task == "sims_cls":
        # `right=True` puts a score equal to an edge in the lower bin, as MMSA's (a, b] bins do.
        return sims_bin(scores, SIMS_BINS["acc5"]).astype(np.int64), scores
    return scores.copy(), scores


def _strings(cache: CachedData, split: str, key: str) -> list[str] | None:
    return np.load(cache.path(split, key)).tolist() if cache.has(split, key) else None


class MultimodalDataset(Dataset):
    """One split of one dataset, reading features from the float32 cache through memory maps.

    Attributes: dataset, task, split, aligned, dims (d_t, d_a, d_v) and seq_lens (L_t, L_a, L_v) of the
    file, output_dim (8, 7, 5 or 1), targets (numpy), scores (numpy or None), unimodal_targets ({label_t:
    numpy, ...} or {}), ids (list of str or None; a row of several id fields is joined with '/'), raw_text
    (list of str, the words of each sample, or None when the file has none).
    """

    def __init__(self, cache: CachedData, split: str, dataset: str, task: str, aligned: bool = True,
                 source: dict | None = None):
        self.dataset = dataset
        self.task = resolve_task(dataset, task)
        self.split = split
        self.aligned = aligned
        self.dims = cache.dims
        self.seq_lens = cache.seq_lens
        self.output_dim = output_dim(self.task)
        self._paths = {m: cache.path(split, m) for m in MODALITIES}
        # Labels are tiny, so targets are computed once and kept in memory.
        self.targets, self.scores = targets_from_labels(np.array(cache.open(split, "labels")), self.task)
        self.unimodal_targets = {key: targets_from_labels(np.array(cache.open(split, key)), self.task)[0]
                                 for key in UNIMODAL_KEYS if cache.has(split, key)}
        self.ids = _strings(cache, split, ID_KEY)
        self.raw_text = _strings(cache, split, RAW_TEXT_KEY)  # for the word subsets only, never batched
        self._length = len(self.targets)
        self.source = source  # the data file the cache was built from: path, size, mtime_ns, sha1
        self._features: dict[str, np.ndarray] | None = None
        # Open now, not at first use: a memory map keeps reading the file it opened even if the cache is
        # rebuilt (from a replaced pickle) later, so every split of a run reads the same data.
        self._arrays()

    # Memory maps are dropped when pickled, so a DataLoader worker process opens its own instead of
    # receiving a copy of the whole array.
    def _arrays(self) -> dict[str, np.ndarray]:
        if self._features is None:
            self._features = {m: np.load(path, mmap_mode="r") for m, path in self._paths.items()}
        return self._features

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_features"] = None
        return state

    def __len__(self) -> int:
        return self._length

    def __repr__(self) -> str:
        return (f"MultimodalDataset({self.dataset}, {self.split}, {'aligned' if self.aligned else 'unaligned'}, "
                f"task={self.task}, n={len(self)}, seq_lens={self.seq_lens}, dims={self.dims})")

    def __getitem__(self, index):
        if isinstance(index, (Integral, np.integer)) or (torch.is_tensor(index) and index.ndim == 0):
            return self._item(int(index))
        return self.get_batch(index)

    def _item(self, index: int) -> dict[str, torch.Tensor]:
        if not -self._length <= index < self._length:
            raise IndexError(f"index {index} is out of range for the {self.split} split of {self._length} samples")
        index %= self._length
        arrays = self._arrays()
        item = {m: torch.from_numpy(np.array(arrays[m][index])) for m in MODALITIES}
        item["target"] = torch.from_numpy(np.array(self.targets[index]))
        if self.scores is not None:
            item["score"] = torch.tensor(self.scores[index])
        for key, targets in self.unimodal_targets.items():
            item[key] = torch.from_numpy(np.array(targets[index]))
        return item

    def get_batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> dict[str, torch.Tensor]:
        """The samples at `indices`, stacked, in the order given (duplicates allowed)."""
        if torch.is_tensor(indices):
            indices = indices.detach().cpu().numpy()
        index = np.asarray(indices, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < -self._length or index.max() >= self._length):
            raise IndexError(f"batch indices out of range for the {self.split} split of {self._length} samples")
        index = index % max(self._length, 1)
        # A memory map reads fastest in file order, so rows are gathered sorted and then put back
        # into the requested order; a contiguous run becomes a plain slice.
        order = np.argsort(index, kind="stable")
        ordered = index[order]
        restore = None
        if not np.array_equal(order, np.arange(index.size)):
            restore = np.empty_like(order)
            restore[order] = np.arange(index.size)
        contiguous = index.size > 0 and ordered[-1] - ordered[0] == index.size - 1 and np.all(np.diff(ordered) == 1)

        batch = {}
        for modality, array in self._arrays().items():
            rows = np.array(array[ordered[0]:ordered[-1] + 1]) if contiguous else array[ordered]
            if restore is not None:
                rows = rows[restore]
            batch[modality] = torch.from_numpy(np.ascontiguousarray(rows))
        batch["target"] = torch.from_numpy(self.targets[index])
        if self.scores is not None:
            batch["score"] = torch.from_numpy(self.scores[index])
        for key, targets in self.unimodal_targets.items():
            batch[key] = torch.from_numpy(targets[index])
        return batch

    def iter_batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                     drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """Yield stacked batches covering the split once (shuffled with `generator` if asked)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        order = torch.randperm(self._length, generator=generator) if shuffle else torch.arange(self._length)
        stop = self._length - self._length % batch_size if drop_last else self._length
        for start in range(0, stop, batch_size):
            yield self.get_batch(order[start:start + batch_size])

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        return self._length // batch_size if drop_last else -(-self._length // batch_size)


def load_splits(data_dir: str | Path | None, dataset: str, aligned: bool = True, task: str | None = None,
                clean_nonfinite: bool = False, data_file: str | Path | None = None,
                data_format: str | None = None) -> dict[str, MultimodalDataset]:
    """Every split of `dataset`'s data file, in the file's order: {"train", "valid", "test", ...}.

    The file is `data_file` when given, else the dataset's file name in `data_dir` (MulT's, or MMSA's
    <DATASET>/Processed/... for datasets that only come in that layout). Its layout (MulT or MMSA) comes
    from its keys; `data_format` ('mult' | 'mmsa') insists on one. The first call validates the pickle
    and converts it into a float32 cache next to it; later calls memory-map the cache. `task` defaults
    to the dataset's first (binary for iemocap, cls for mosei_senti / mosi, sims_cls for sims).
    `clean_nonfinite` replaces NaN/+-inf found outside the audio -inf (which always becomes 0) with 0
    instead of reporting them as an error. Every problem with the file or the arguments raises a
    DataError/ConfigError that names it.
    """
    spec = get_spec(dataset)
    task = resolve_task(dataset, task)
    check_format(data_format)
    path = require_data_file(data_dir, dataset, aligned, data_file)
    cache = prepare_cache(path, spec, clean_nonfinite=clean_nonfinite, data_format=data_format)
    source = {"path": str(Path(path).resolve()), "format": cache.format, **cache.manifest["source"]}
    return {split: MultimodalDataset(cache, split, dataset, task, aligned, source) for split in cache.splits}


def require_splits(splits: dict, needed, what: str) -> None:
    """A DataError naming the file when it lacks a split `what` (e.g. 'training') needs."""
    missing = [name for name in needed if name not in splits]
    if missing:
        source = next(iter(splits.values())).source["path"]
        raise DataError(f"{source} has no split {', '.join(repr(m) for m in missing)}, which {what} needs "
                        f"(the file holds: {', '.join(splits)})")
