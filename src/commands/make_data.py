"""A synthetic dataset file in the exact MulT or MMSA pickle layout, optionally with a planted label shortcut."""
from __future__ import annotations

from pathlib import Path

from ..data import data_file, get_spec
from ..data.synthetic import write_synthetic
from ..errors import UserError


def make_data(dataset: str, data_dir: str = "data", unaligned: bool = False, scale: float = 0.1, seed: int = 0,
              bias_modality: str | None = None, bias_strength: float = 0.0, force: bool = False,
              data_format: str | None = None, extra_splits=(), path: str | None = None) -> Path:
    """Write the file (refusing to replace an existing one unless `force`) and return its path: `path`, or
    data_dir's file for the dataset. `data_format`: mult or mmsa (default: the dataset's first layout);
    `extra_splits`: more splits drawn as test is (e.g. test_ood)."""
    if bias_modality is not None and not bias_strength > 0:
        raise UserError(f"--bias-modality {bias_modality} plants a shortcut only with --bias-strength in "
                        f"(0, 1] (how often it agrees with the label); got {bias_strength}")
    fmt = data_format or get_spec(dataset).formats[0]
    target = Path(path) if path else data_file(data_dir, dataset, not unaligned, fmt)
    if target.exists() and not force:
        raise UserError(f"{target} already exists; pass --force to overwrite it (it may be a real dataset)")
    written = write_synthetic(data_dir, dataset, aligned=not unaligned, scale=scale, seed=seed,
                              bias_modality=bias_modality, bias_strength=bias_strength, data_format=fmt,
                              extra_splits=tuple(extra_splits), path=target)
    print(f"wrote synthetic {dataset} ({'unaligned' if unaligned else 'aligned'}, {fmt} layout) to {written}")
    return written
