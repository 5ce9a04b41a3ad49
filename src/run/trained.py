"""A trained run read back from its directory: its checkpoint by name, its config, data and model, and
what its result files are named after.

A notebook starts here: `cfg, splits, model, saved = load_run(run_dir, "best_acc", torch.device("cpu"))`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import UserError
from . import checkpoint as ckpt_io
from .build import load_data, make_model
from .config import model_signature


def checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    """best_acc, best_loss, last (the run's own checkpoints) or a path to any .pt file."""
    if checkpoint.endswith(".pt"):
        return Path(checkpoint)
    if checkpoint not in ckpt_io.CHECKPOINT_NAMES:
        raise UserError(f"--checkpoint '{checkpoint}' is unknown; use best_acc, best_loss, last or a .pt path")
    return Path(run_dir) / ckpt_io.CHECKPOINT_NAMES[checkpoint]


def load_run(run_dir: Path, checkpoint: str, device, data_dir: str | None = None):
    """(config, splits, model with the checkpoint's weights, checkpoint) of a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; train it first with main.py train (or main.sh)")
    cfg = ckpt_io.read_config_file(run_dir / "config.yaml")
    if data_dir is not None:
        cfg["data"]["dir"] = data_dir
    path = checkpoint_path(run_dir, checkpoint)
    saved = ckpt_io.load_checkpoint(path)
    ckpt_io.check_compatible(saved, path, model_signature(cfg))
    splits = load_data(cfg)
    model = make_model(cfg, splits["train"], device)
    ckpt_io.load_model_state(model, saved["model"], path)
    return cfg, splits, model, saved


def provenance(run_dir: Path, checkpoint: str, saved: dict, dataset) -> dict:
    """What a result came from: the checkpoint (path, epoch) and the data file, for its result file."""
    return {"checkpoint": {"path": str(checkpoint_path(run_dir, checkpoint).resolve()), "epoch": saved["epoch"]},
            "data": dataset.source, "split": dataset.split}


def result_tag(run_dir: Path, checkpoint: str, data_dir: str | None, source: dict) -> str:
    """The name part of a result file: the checkpoint's name for the run's own checkpoint on its own data;
    otherwise also a digest of the checkpoint and data file, so a foreign evaluation never overwrites
    the run's own results (and two foreign ones of different origin never overwrite each other)."""
    path = checkpoint_path(run_dir, checkpoint).resolve()
    own_checkpoint = path.parent == Path(run_dir).resolve() and path.name in ckpt_io.CHECKPOINT_NAMES.values()
    run_data = ckpt_io.read_config_file(Path(run_dir) / "config.yaml")["data"]["dir"]
    own_data = data_dir is None or Path(data_dir).resolve() == Path(run_data).resolve()
    if own_checkpoint and own_data:
        return path.stem
    digest = hashlib.sha1(f"{path}\n{source['path']}".encode()).hexdigest()[:8]
    return f"{path.stem}-{digest}"
