"""What each dataset means (labels, tasks) and what its files nominally look like (names, sizes).

Everything that depends on the dataset name lives here, so that validation, the cache, the Dataset and
the synthetic generator all agree on one description. Two file layouts are read (docs/design.md § Data):
MulT's pickles (keys text/audio/vision/labels) and MMSA's feature pickles (text/audio/vision/
regression_labels, MOSI/MOSEI/SIMS). The feature sizes and sequence lengths a loader uses come from the
file itself; the nominal ones here are what `make-data` writes and what the real files hold.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..modalities import MODALITIES

SPLITS = ("train", "valid", "test")
# What a run needs to train; any other split a file holds (test_iid, test_ood, ...) is evaluated too.
TRAINING_SPLITS = ("train", "valid")
FORMATS = ("mult", "mmsa")
# The key that tells the layouts apart: every split of a MulT file has `labels`, of an MMSA file
# `regression_labels`.
FORMAT_LABEL_KEYS = {"mult": "labels", "mmsa": "regression_labels"}
# `id` is optional: the IEMOCAP files carry none.
REQUIRED_KEYS = MODALITIES + ("labels",)
ID_KEY = "id"
# Optional too: the words of each sample (MMSA's files), for the word bias subsets; never part of a batch.
RAW_TEXT_KEY = "raw_text"
# The per-sample strings a file may hold, cached and loaded as one str per sample.
STRING_KEYS = (ID_KEY, RAW_TEXT_KEY)

# IEMOCAP's four emotions, in the order of the label pairs in the file.
IEMOCAP_EMOTIONS = ("neutral", "happy", "sad", "angry")


@dataclass(frozen=True)
class DatasetSpec:
    """The layout one dataset name implies."""

    name: str
    aligned_file: str | None                    # MulT's file names (None: the dataset has no MulT files)
    unaligned_file: str | None
    dims: tuple[int, int, int]                  # (d_t, d_a, d_v) of MulT's files
    label_shape: tuple[int, int]                # labels are (N, *label_shape)
    tasks: tuple[str, ...]                      # the first one is the default
    split_sizes: tuple[int, int, int]           # N of train/valid/test in the real files
    aligned_seq_lens: tuple[int, int, int]      # (L_t, L_a, L_v) in the real files
    unaligned_seq_lens: tuple[int, int, int]
    text_dtype: str = "float64"                 # the real MOSI file stores text as float32
    has_ids: bool = True
    # MMSA's files: <mmsa_folder>/Processed/{aligned,unaligned}_<L_t>.pkl, BERT text features.
    mmsa_folder: str | None = None
    mmsa_dims: tuple[int, int, int] | None = None
    mmsa_aligned_seq_lens: tuple[int, int, int] | None = None
    mmsa_unaligned_seq_lens: tuple[int, int, int] | None = None
    score_range: float = 3.0                    # sentiment scores lie in [-score_range, score_range]
    unimodal_labels: bool = False               # the files hold one label per modality (SIMS)

    @property
    def default_task(self) -> str:
        return self.tasks[0]

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(f for f, has in (("mult", self.aligned_file), ("mmsa", self.mmsa_folder)) if has)

    def file_name(self, aligned: bool, fmt: str = "mult") -> str:
        if fmt == "mmsa":
            lens = self.seq_lens(aligned, "mmsa")
            return f"{self.mmsa_folder}/Processed/{'aligned' if aligned else 'unaligned'}_{lens[0]}.pkl"
        return self.aligned_file if aligned else self.unaligned_file

    def seq_lens(self, aligned: bool, fmt: str = "mult") -> tuple[int, int, int]:
        if fmt == "mmsa":
            return self.mmsa_aligned_seq_lens if aligned else self.mmsa_unaligned_seq_lens
        return self.aligned_seq_lens if aligned else self.unaligned_seq_lens

    def feature_dims(self, fmt: str = "mult") -> tuple[int, int, int]:
        return self.mmsa_dims if fmt == "mmsa" else self.dims

    def dim(self, modality: str, fmt: str = "mult") -> int:
        return self.feature_dims(fmt)[MODALITIES.index(modality)]


DATASETS: dict[str, DatasetSpec] = {
    "iemocap": DatasetSpec(
        name="iemocap",
        aligned_file="iemocap_data.pkl",
        unaligned_file="iemocap_data_noalign.pkl",
        dims=(300, 74, 35),
        label_shape=(4, 2),
        tasks=("binary",),
        split_sizes=(2717, 798, 938),
        aligned_seq_lens=(20, 20, 20),
        unaligned_seq_lens=(20, 400, 500),
        has_ids=False,
    ),
    "mosei_senti": DatasetSpec(
        name="mosei_senti",
        aligned_file="mosei_senti_data.pkl",
        unaligned_file="mosei_senti_data_noalign.pkl",
        dims=(300, 74, 35),
        label_shape=(1, 1),
        tasks=("cls", "regression"),
        split_sizes=(16326, 1871, 4659),
        aligned_seq_lens=(50, 50, 50),
        unaligned_seq_lens=(50, 500, 500),
        mmsa_folder="MOSEI",
        mmsa_dims=(768, 74, 35),
        mmsa_aligned_seq_lens=(50, 50, 50),
        mmsa_unaligned_seq_lens=(50, 500, 375),
    ),
    "mosi": DatasetSpec(
        name="mosi",
        aligned_file="mosi_data.pkl",
        unaligned_file="mosi_data_noalign.pkl",
        dims=(300, 5, 20),
        label_shape=(1, 1),
        tasks=("cls", "regression"),
        split_sizes=(1284, 229, 686),
        aligned_seq_lens=(50, 50, 50),
        unaligned_seq_lens=(50, 375, 500),
        text_dtype="float32",
        mmsa_folder="MOSI",
        mmsa_dims=(768, 5, 20),
        mmsa_aligned_seq_lens=(50, 50, 50),
        mmsa_unaligned_seq_lens=(50, 500, 375),
    ),
    # CH-SIMS (Chinese): MMSA files only, scores in [-1, 1] and a label per modality as well.
    "sims": DatasetSpec(
        name="sims",
        aligned_file=None,
        unaligned_file=None,
        dims=(768, 33, 709),
        label_shape=(1, 1),
        tasks=("sims_cls", "sims_regression"),
        split_sizes=(1368, 456, 457),
        aligned_seq_lens=(39, 39, 39),
        unaligned_seq_lens=(39, 400, 55),
        text_dtype="float32",
        mmsa_folder="SIMS",
        mmsa_dims=(768, 33, 709),
        mmsa_aligned_seq_lens=(39, 39, 39),
        mmsa_unaligned_seq_lens=(39, 400, 55),
        score_range=1.0,
        unimodal_labels=True,
    ),
}

# CH-SIMS's bins of a score in [-1, 1] (MMSA's metrics; acc5's are the sims_cls classes): the inner
# edges, each bin (lower, upper], the lowest taking -1 too.
SIMS_BINS = {"acc2": (0.0,), "acc3": (-0.1, 0.1), "acc5": (-0.7, -0.1, 0.1, 0.7)}


def sims_bin(scores, edges) -> np.ndarray:
    """The bin of each score, compared in float32 as MMSA compares its float32 labels: the label -0.7,
    stored as float32, then falls in the bin that ends at -0.7, not in the next one."""
    return np.digitize(np.asarray(scores, dtype=np.float32), np.asarray(edges, dtype=np.float32), right=True)


# Output width of the models for each task: IEMOCAP's 4 (absent, present) pairs, 7 sentiment
# classes (-3..3), SIMS's 5 classes (MMSA's Acc5 bins), or one regressed score.
OUTPUT_DIMS = {"binary": 8, "cls": 7, "regression": 1, "sims_cls": 5, "sims_regression": 1}


def get_spec(dataset: str) -> DatasetSpec:
    """The spec for a dataset name; an unknown name is a DataError listing the valid ones."""
    try:
        return DATASETS[dataset]
    except (KeyError, TypeError):
        raise DataError(
            f"unknown dataset '{dataset}'; valid names: {', '.join(DATASETS)}"
        ) from None


def resolve_task(dataset: str, task: str | None) -> str:
    """The task to train: the dataset's default when None, otherwise one the dataset supports."""
    spec = get_spec(dataset)
    if task is None:
        return spec.default_task
    if task not in spec.tasks:
        raise ConfigError(
            f"task '{task}' is not available for dataset '{dataset}'; valid tasks: {', '.join(spec.tasks)}"
        )
    return task


def output_dim(task: str) -> int:
    try:
        return OUTPUT_DIMS[task]
    except KeyError:
        raise ConfigError(f"unknown task '{task}'; valid tasks: {', '.join(OUTPUT_DIMS)}") from None


def check_format(fmt: str | None) -> str | None:
    if fmt is not None and fmt not in FORMATS:
        raise ConfigError(f"unknown data format '{fmt}'; valid formats: {', '.join(FORMATS)}")
    return fmt


def data_file(data_dir: str | Path, dataset: str, aligned: bool = True, fmt: str | None = None) -> Path:
    """Where the pickle of `dataset` lives in `data_dir` (the file need not exist): MulT's file name,
    or MMSA's `<DATASET>/Processed/...` for fmt 'mmsa' and for datasets that only come in that layout."""
    spec = get_spec(dataset)
    fmt = check_format(fmt) or spec.formats[0]
    if fmt not in spec.formats:
        raise ConfigError(f"{dataset} has no {fmt} files; its formats: {', '.join(spec.formats)}")
    return Path(data_dir) / spec.file_name(aligned, fmt)


def require_data_file(data_dir: str | Path, dataset: str, aligned: bool = True, path: str | Path | None = None) -> Path:
    """The file to read: `path` when given (--data-file), else the file-name rule of data_file in
    `data_dir`. A missing file is a DataError that says how to obtain one."""
    path = Path(path) if path is not None else data_file(data_dir, dataset, aligned)
    if path.is_file():
        return path
    flag = "" if aligned else " --unaligned"
    layout = "aligned" if aligned else "unaligned"
    if path.exists():
        problem = f"{path} exists but is not a regular file"
    else:
        problem = f"no {layout} {dataset} data: expected the file {path}"
    raise DataError(
        f"{problem}. Put the pickle there (MulT's preprocessed files, or MMSA's feature pickles), point "
        f"--data-dir at the folder that holds it or --data-file at the file itself, or write a synthetic "
        f"file with: python main.py make-data --dataset {dataset}{flag} --data-dir {path.parent}"
    )
