"""The data layer: MulT or MMSA pickles -> validated float32 cache -> memory-mapped Dataset.

    load_splits(data_dir, dataset, aligned=True, task=None, clean_nonfinite=False, data_file=None,
                data_format=None) -> {"train", "valid", "test", ...every split of the file} of MultimodalDataset
    write_synthetic(data_dir, dataset, aligned=True, scale=0.05, seed=0, bias_modality=None,
                    bias_strength=0.0, signal=1.0, data_format="mult", extra_splits=(), path=None) -> Path

See docs/architecture.md (Data) for the item/batch contract.
"""
from .dataset import MultimodalDataset, load_splits, require_splits, targets_from_labels
from .formats import UNIMODAL_KEYS
from .layout import (DATASETS, FORMATS, IEMOCAP_EMOTIONS, MODALITIES, SPLITS, TRAINING_SPLITS, data_file,
                     get_spec, output_dim, require_data_file, resolve_task)
from .safe_pickle import safe_load
from .synthetic import DEFAULT_DEMO, shortcut_directions, signal_directions, write_synthetic

__all__ = [
    "DATASETS", "DEFAULT_DEMO", "FORMATS", "IEMOCAP_EMOTIONS", "MODALITIES", "SPLITS", "TRAINING_SPLITS",
    "UNIMODAL_KEYS", "MultimodalDataset", "data_file", "get_spec", "load_splits",
    "output_dim", "require_data_file", "require_splits", "resolve_task", "safe_load", "shortcut_directions",
    "signal_directions", "targets_from_labels", "write_synthetic",
]
