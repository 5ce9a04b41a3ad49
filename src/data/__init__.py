"""The data layer: MulT pickles -> validated float32 cache -> memory-mapped Dataset.

    load_splits(data_dir, dataset, aligned=True, task=None, clean_nonfinite=False)
        -> {"train", "valid", "test"} of MultimodalDataset
    write_synthetic(data_dir, dataset, aligned=True, scale=0.05, seed=0, bias_modality=None,
                    bias_strength=0.0, signal=1.0) -> Path

See docs/architecture.md (Data) for the item/batch contract.
"""
from .dataset import MultimodalDataset, load_splits, targets_from_labels
from .layout import (DATASETS, IEMOCAP_EMOTIONS, MODALITIES, SPLITS, data_file, get_spec,
                             output_dim, require_data_file, resolve_task)
from .safe_pickle import safe_load
from .synthetic import DEFAULT_DEMO, shortcut_directions, signal_directions, write_synthetic

__all__ = [
    "DATASETS", "DEFAULT_DEMO", "IEMOCAP_EMOTIONS", "MODALITIES", "SPLITS", "MultimodalDataset",
    "data_file", "get_spec", "load_splits", "output_dim", "require_data_file",
    "resolve_task", "safe_load", "shortcut_directions", "signal_directions", "targets_from_labels",
    "write_synthetic",
]
