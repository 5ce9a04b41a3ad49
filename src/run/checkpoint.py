"""Checkpoints: tensors-only state dicts, written atomically, read with weights_only=True.

A checkpoint holds the model, optimiser and scheduler states, the RNG states, the epoch it closes,
the selection bookkeeping, and the resolved config (as YAML text) so that a checkpoint from another
model or config is refused instead of silently half-loaded, and the identity of the run that wrote it
(src/run/identity.py) so that a checkpoint of another run is not taken for the run's own.
"""
from __future__ import annotations

import pickle
import random
import zipfile
from pathlib import Path

import numpy as np
import torch
import yaml

from ..atomic import replacing
from ..errors import CheckpointError, NonFiniteError
from .config import fill_defaults, model_signature, upgrade_config, without_execution_keys
from .yamlfile import load_yaml

CHECKPOINT_NAMES = {"last": "last.pt", "best_loss": "best_loss.pt", "best_acc": "best_acc.pt"}


def atomic_save(obj, path: Path) -> None:
    """torch.save through src.atomic: a kill at any moment leaves the old file or the new one, never a torn one.

    torch.save is given an open file rather than a path: writing to a path, its C++ writer reports a full
    disk as a RuntimeError ("unexpected pos"), while through a Python file the OSError (ENOSPC) itself
    arrives, which src.atomic turns into a message naming the file."""
    with replacing(path) as tmp:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)


def weights_record(model: torch.nn.Module, config_text: str, epoch: int, run: dict | None, feature_dims) -> dict:
    """What every checkpoint holds (WEIGHTS_FIELDS below): the weights, the run's config, the epoch they
    close (0 for weights that were not trained here), the identity of the run that wrote them (`run`,
    src/run/identity.py) and the (text, audio, vision) feature sizes the model reads, so that a file of
    other sizes is refused by name. `last` adds the training state to it."""
    return {"model": model.state_dict(), "config": config_text, "epoch": epoch, "run": run,
            "feature_dims": list(feature_dims)}


def _first_line(err: BaseException) -> str:
    lines = str(err).splitlines()
    return lines[0] if lines else type(err).__name__


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


def restore_rng_state(state: dict, path: Path) -> None:
    try:
        set_rng_state(state)
    except (TypeError, ValueError, RuntimeError, IndexError, KeyError) as err:
        raise CheckpointError(f"checkpoint {path}: its saved random-number-generator state cannot be restored "
                              f"({_first_line(err)}); the run cannot resume exactly from it") from None


def load_scheduler_state(scheduler, state: dict, path: Path) -> None:
    """The scheduler's load_state_dict takes any dict as its attributes; accept only its own keys and types."""
    own = scheduler.state_dict()
    for key, value in state.items():
        if key not in own or (own[key] is not None and value is not None and not isinstance(value, type(own[key]))
                              and not (isinstance(own[key], (int, float)) and isinstance(value, (int, float)))):
            raise CheckpointError(f"checkpoint {path}: its scheduler state holds {key} = {value!r}, which a "
                                  f"{type(scheduler).__name__} does not have; the run cannot resume from it")
    scheduler.load_state_dict(state)


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


def verify_checksums(path: Path) -> None:
    """Check every member of the checkpoint's zip against its stored CRC-32.

    torch.load reads a torch zip without checking the CRCs, so a flipped bit in the weights would load
    as a silently different model; reading each member through zipfile checks them."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        size = path.stat().st_size if path.exists() else 0
        what = "is empty (0 bytes: a write that never happened?)" if size == 0 else f"is not a readable zip ({err})"
        raise CheckpointError(f"checkpoint {path} cannot be read: it {what}, so it is not a checkpoint of this "
                              "tool, or it is truncated or corrupt. Use another checkpoint, or train again.") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: the bytes of its member '{bad}' do not match their "
                              "stored checksum (a flipped bit on disk or in a copy). Use another checkpoint, or "
                              "train again.")


# What each part of a checkpoint must be, so that a crafted or damaged one is refused by name instead of
# failing somewhere inside the loop. Every checkpoint holds the weights; `last` also the training state.
WEIGHTS_FIELDS = {"model": dict, "config": str, "epoch": int}
RESUME_FIELDS = {"optimizer": dict, "scheduler": dict, "rng": dict, "state": dict}
STATE_FIELDS = {"epoch": int, "best_loss": (int, float), "best_acc": (int, float), "since_best": int,
                "history": list}
RNG_FIELDS = {"torch": torch.Tensor, "numpy_keys": torch.Tensor, "numpy_meta": list, "python": list}


def _check_fields(node: dict, fields: dict, path: Path, where: str) -> None:
    for key, types in fields.items():
        if key not in node:
            raise CheckpointError(f"checkpoint {path} is not a checkpoint of this tool: {where}'{key}' is missing")
        value = node[key]
        if not isinstance(value, types) or isinstance(value, bool):
            names = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
            raise CheckpointError(f"checkpoint {path} is not a checkpoint of this tool: {where}'{key}' is of type "
                                  f"{type(value).__name__}, not {names}")


def check_structure(ckpt, path: Path, resumable: bool = False) -> None:
    """Refuse a checkpoint whose parts are missing or of the wrong type, naming the part."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of this tool: it holds a "
                              f"{type(ckpt).__name__}, not a dict")
    _check_fields(ckpt, WEIGHTS_FIELDS, path, "")
    bad = next((k for k, v in ckpt["model"].items() if not isinstance(k, str) or not torch.is_tensor(v)), None)
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of this tool: its model state holds "
                              f"{bad!r}, which is not a named tensor")
    try:
        config = load_yaml(ckpt["config"])
    except yaml.YAMLError as err:
        raise CheckpointError(f"checkpoint {path}: its saved config is not valid YAML ({err})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint {path}: its saved config is a {type(config).__name__}, not a mapping")
    if resumable:
        _check_fields(ckpt, RESUME_FIELDS, path, "")
        _check_fields(ckpt["state"], STATE_FIELDS, path, "state.")
        _check_fields(ckpt["rng"], RNG_FIELDS, path, "rng.")


def load_checkpoint(path: Path, resumable: bool = False) -> dict:
    """Read a checkpoint as tensors only; a missing, corrupt or malformed file is a CheckpointError naming it.

    resumable: also require the training state `last.pt` holds (optimizer, scheduler, RNG, bookkeeping)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    verify_checksums(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise CheckpointError(f"checkpoint {path} cannot be read (corrupt, truncated, or not a checkpoint "
                                  f"of this tool): {_first_line(err)}") from None
        # torch's text (with terminal colour codes) explains its own loader; what matters here is the file.
        raise CheckpointError(f"checkpoint {path} holds pickled Python objects, not tensors: it is a whole-model "
                              "file (torch.save(model)), as the published CausalMER code writes them, not a "
                              "checkpoint of this tool. Convert it into a run with `python main.py import-checkpoint "
                              f"{path} --dataset <dataset> --name <name>` (it reads the file without running anything from "
                              "it) and evaluate that run.") from None
    except Exception as err:  # torch raises several types for torn zips and foreign pickles
        raise CheckpointError(f"checkpoint {path} cannot be read (corrupt, truncated, or not a checkpoint "
                              f"of this tool): {_first_line(err)}") from None
    state = ckpt.get("state") if isinstance(ckpt, dict) else None
    if isinstance(state, dict) and "best_score" in state and "best_acc" not in state:
        # written before the run state named its best headline score after its checkpoint, best_acc.pt
        state["best_acc"] = state.pop("best_score")
    check_structure(ckpt, path, resumable)
    return ckpt


def checkpoint_config(ckpt: dict) -> dict:
    return fill_defaults(upgrade_config(load_yaml(ckpt["config"]), "the config inside a checkpoint"))


def check_compatible(ckpt: dict, path: Path, expected_signature: dict) -> None:
    """Refuse a checkpoint whose model-defining config differs from the run's, naming the first difference."""
    try:
        found = model_signature(checkpoint_config(ckpt))
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path}: its saved config lacks {err} (not a checkpoint of this tool, "
                              "or a damaged one)") from None
    difference = first_difference(found, expected_signature)
    if difference:
        key, got, want = difference
        raise CheckpointError(f"checkpoint {path} was trained with a different model or config: {key} is "
                              f"{got!r} there but {want!r} here. Use the matching config, or another run name.")


def first_difference(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            found = first_difference(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
            if found:
                return found
        return None
    return None if a == b else (prefix, a, b)


def check_finite_weights(state: dict, path: Path) -> None:
    """Refuse weights holding NaN or inf: every prediction of such a model is meaningless."""
    for name, tensor in (state.items() if isinstance(state, dict) else ()):
        if torch.is_tensor(tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise NonFiniteError(f"checkpoint {path} holds non-finite weights: {name} has {bad} NaN or inf "
                                 f"value(s) of {tensor.numel()}; it cannot be evaluated or resumed")


def load_model_state(model: torch.nn.Module, state: dict, path: Path) -> None:
    check_finite_weights(state, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {_first_line(err)}") from None


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, path: Path) -> None:
    """Adam's state for a resumed run. It is stored per parameter tensor, so a checkpoint written
    with another parameter layout (an earlier version of a model) cannot continue the run."""
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError, TypeError) as err:
        raise CheckpointError(f"checkpoint {path} holds optimizer state for another parameter layout (written by "
                              f"an earlier version of this model?), so the run cannot resume: {err}; its weights "
                              f"still load for evaluation") from None


def read_config_file(path: Path) -> dict:
    if not Path(path).is_file():
        raise CheckpointError(f"{path} not found: this directory does not hold a run of this tool")
    try:
        cfg = load_yaml(Path(path).read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable run config: {err}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} is not a run config of this tool: it holds a {type(cfg).__name__}, not a "
                              "mapping of sections (data, model, loss, train)")
    return fill_defaults(upgrade_config(cfg, str(path)))


def check_same_config(saved: dict, requested: dict, path: Path) -> None:
    """--resume must continue the same experiment: any difference in the resolved config but its
    execution keys (compile, logger: src/run/config.py) is refused; the engine is not one of them."""
    difference = first_difference(without_execution_keys(saved), without_execution_keys(requested))
    if difference:
        key, got, want = difference
        raise CheckpointError(f"--resume: the run in {Path(path).parent} was started with {key} = {got!r}, "
                              f"but this command asks for {want!r}. Resume with the same options, or start a "
                              "new run under another --name.")
