"""Checkpoints: tensors-only state dicts, written atomically, read with weights_only=True.

A checkpoint holds the model, optimiser and scheduler states, the RNG states, the epoch it closes,
the selection bookkeeping, and the resolved config (as YAML text) so that a checkpoint from another
model or config is refused instead of silently half-loaded.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import yaml

from src.errors import CheckpointError

CHECKPOINT_NAMES = {"last": "last.pt", "best_loss": "best_loss.pt", "best_acc": "best_acc.pt"}


def atomic_save(obj, path: Path) -> None:
    """torch.save to a temporary file in the same directory, fsync, then rename over the target.

    A rename within one filesystem is atomic, so a kill at any moment leaves either the old file or the
    new one, never a torn file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: Path) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state() -> dict:
    """All RNG states as tensors and plain lists (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_meta": [int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _to_lists(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, cached = state["numpy_meta"]
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(_to_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _to_lists(obj):
    return [_to_lists(x) for x in obj] if isinstance(obj, (tuple, list)) else obj


def _to_tuples(obj):
    return tuple(_to_tuples(x) for x in obj) if isinstance(obj, list) else obj


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint as tensors only; a missing or corrupt file is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for torn zips and foreign pickles
        raise CheckpointError(f"checkpoint {path} cannot be read (corrupt, truncated, or not a checkpoint "
                              f"of this tool): {str(err).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of this tool (no model state or config)")
    return ckpt


def checkpoint_config(ckpt: dict) -> dict:
    return yaml.safe_load(ckpt["config"])


def check_compatible(ckpt: dict, path: Path, expected_signature: dict, signature_fn) -> None:
    """Refuse a checkpoint whose model-defining config differs from the run's, naming the first difference."""
    found = signature_fn(checkpoint_config(ckpt))
    difference = _first_difference(found, expected_signature)
    if difference:
        key, got, want = difference
        raise CheckpointError(f"checkpoint {path} was trained with a different model or config: {key} is "
                              f"{got!r} there but {want!r} here. Use the matching config, or another run name.")


def _first_difference(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = _first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
            if found:
                return found
        return None
    return None if a == b else (prefix, a, b)


def load_model_state(model: torch.nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {str(err).splitlines()[0]}") from None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, path: Path) -> None:
    """Adam's state for a resumed run. It is stored per parameter tensor, so a checkpoint written
    with another parameter layout (an earlier version of a model) cannot continue the run."""
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {path} holds optimizer state for another parameter layout (written by "
                              f"an earlier version of this model?), so the run cannot resume: {err}; its weights "
                              f"still load for evaluation") from None


def read_config_file(path: Path) -> dict:
    if not Path(path).is_file():
        raise CheckpointError(f"{path} not found: this directory does not hold a run of this tool")
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise CheckpointError(f"{path} is not a readable run config: {err}") from None


# Keys that say how a run executes, not what it computes: a run may resume with another value.
EXECUTION_KEYS = (("train", "compile"),)


def _without_execution_keys(cfg: dict) -> dict:
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in cfg.items()}
    for section, key in EXECUTION_KEYS:
        if isinstance(out.get(section), dict):
            out[section].pop(key, None)
    return out


def check_same_config(saved: dict, requested: dict, path: Path) -> None:
    """--resume must continue the same experiment: any difference in the resolved config is refused,
    except in EXECUTION_KEYS (torch.compile on or off trains the same model)."""
    difference = _first_difference(_without_execution_keys(saved), _without_execution_keys(requested))
    if difference:
        key, got, want = difference
        raise CheckpointError(f"--resume: the run in {Path(path).parent} was started with {key} = {got!r}, "
                              f"but this command asks for {want!r}. Resume with the same options, or start a "
                              "new run under another --name.")
