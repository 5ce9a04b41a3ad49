"""What each dataset's MulT pickle looks like: file names, feature sizes, label layout and tasks.

Everything that depends on the dataset name lives here, so that validation, the cache, the Dataset and
the synthetic generator all agree on one description of the files (docs/design.md § Data).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, DataError
from ..modalities import MODALITIES

SPLITS = ("train", "valid", "test")
# `id` is optional: the IEMOCAP files carry none.
REQUIRED_KEYS = MODALITIES + ("labels",)
ID_KEY = "id"

# IEMOCAP's four emotions, in the order of the label pairs in the file.
IEMOCAP_EMOTIONS = ("neutral", "happy", "sad", "angry")


@dataclass(frozen=True)
class DatasetSpec:
    """The layout one dataset name implies."""

    name: str
    aligned_file: str
    unaligned_file: str
    dims: tuple[int, int, int]                  # (d_t, d_a, d_v)
    label_shape: tuple[int, int]                # labels are (N, *label_shape)
    tasks: tuple[str, ...]                      # the first one is the default
    split_sizes: tuple[int, int, int]           # N of train/valid/test in the real files
    aligned_seq_lens: tuple[int, int, int]      # (L_t, L_a, L_v) in the real files
    unaligned_seq_lens: tuple[int, int, int]
    text_dtype: str = "float64"                 # the real MOSI file stores text as float32
    has_ids: bool = True

    @property
    def default_task(self) -> str:
        return self.tasks[0]

    def file_name(self, aligned: bool) -> str:
        return self.aligned_file if aligned else self.unaligned_file

    def seq_lens(self, aligned: bool) -> tuple[int, int, int]:
        return self.aligned_seq_lens if aligned else self.unaligned_seq_lens

    def dim(self, modality: str) -> int:
        return self.dims[MODALITIES.index(modality)]


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
    ),
}

# Output width of the models for each task: IEMOCAP's 4 (absent, present) pairs, 7 sentiment
# classes (-3..3), or one regressed score.
OUTPUT_DIMS = {"binary": 8, "cls": 7, "regression": 1}


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


def data_file(data_dir: str | Path, dataset: str, aligned: bool = True) -> Path:
    """Where the pickle of `dataset` lives in `data_dir` (the file need not exist)."""
    return Path(data_dir) / get_spec(dataset).file_name(aligned)


def require_data_file(data_dir: str | Path, dataset: str, aligned: bool = True) -> Path:
    """Like data_file, but a missing file is a DataError that says how to obtain one."""
    path = data_file(data_dir, dataset, aligned)
    if path.is_file():
        return path
    flag = "" if aligned else " --unaligned"
    layout = "aligned" if aligned else "unaligned"
    if path.exists():
        problem = f"{path} exists but is not a regular file"
    else:
        problem = f"no {layout} {dataset} data: expected the file {path}"
    raise DataError(
        f"{problem}. Put the MulT-preprocessed pickle '{path.name}' there (the real files come with "
        f"the MulT code release), point --data-dir at the folder that holds it, or write a synthetic "
        f"file in the same layout with: python main.py make-data --dataset {dataset}{flag} "
        f"--data-dir {path.parent}"
    )
