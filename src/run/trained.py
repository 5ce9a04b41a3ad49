"""A trained run read back from its directory: its checkpoint by name, its config, data and model, and
what its result files are named after.

A notebook starts here: `cfg, splits, model, saved = load_run(run_dir, "best_acc", torch.device("cpu"))`.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import UserError
from . import checkpoint as ckpt_io
from . import identity as run_identity
from .build import load_data, make_model
from .config import model_signature


def checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    """best_acc, best_loss, last (the run's own checkpoints) or a path to any .pt file."""
    if checkpoint.endswith(".pt"):
        return Path(checkpoint)
    if checkpoint not in ckpt_io.CHECKPOINT_NAMES:
        raise UserError(f"--checkpoint '{checkpoint}' is unknown; use best_acc, best_loss, last or a .pt path")
    return Path(run_dir) / ckpt_io.CHECKPOINT_NAMES[checkpoint]


def load_run(run_dir: Path, checkpoint: str, device, data_dir: str | None = None, dataset: str | None = None,
             data_file: str | None = None, data_format: str | None = None):
    """(config, splits, model with the checkpoint's weights, checkpoint) of a run directory, on the run's
    own data or on the file that `data_dir` / `data_file` (read as `data_format`) point at.

    `dataset`: the dataset the command line names, which the run's config must be of. A checkpoint named
    by the run's own name (best_acc, best_loss, last) must have been written by this run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; train it first with main.py train (or main.sh)")
    cfg = ckpt_io.read_config_file(run_dir / "config.yaml")
    if dataset is not None:
        check_run_dataset(cfg, dataset, run_dir)
    if data_dir is not None:
        cfg["data"]["dir"], cfg["data"]["file"] = data_dir, None
    if data_file is not None:
        cfg["data"]["file"] = data_file
    if data_format is not None:
        cfg["data"]["format"] = data_format
    path = checkpoint_path(run_dir, checkpoint)
    saved = ckpt_io.load_checkpoint(path)
    ckpt_io.check_compatible(saved, path, model_signature(cfg))
    if checkpoint in ckpt_io.CHECKPOINT_NAMES:
        run_identity.check_own_checkpoint(saved, path, run_dir, checkpoint, run_identity.read_identity(run_dir))
    splits = load_data(cfg)
    any_split = next(iter(splits.values()))  # a file to evaluate needs no train split
    check_feature_dims(saved, path, any_split)
    model = make_model(cfg, any_split, device)
    ckpt_io.load_model_state(model, saved["model"], path)
    return cfg, splits, model, saved


def check_feature_dims(saved: dict, path: Path, dataset) -> None:
    """A model reads the feature sizes it was trained on: a file of other sizes is refused, naming both."""
    trained = saved.get("feature_dims")
    if trained is not None and tuple(trained) != tuple(dataset.dims):
        raise UserError(f"checkpoint {path} was trained on features of sizes (text, audio, vision) = {tuple(trained)}, "
                        f"but {dataset.source['path']} holds {tuple(dataset.dims)}; evaluate it on a file with the "
                        "features it was trained on")


def pick_split(splits: dict, split: str):
    """The split a command names, or a message listing the splits the file holds."""
    if split not in splits:
        source = next(iter(splits.values())).source["path"]
        raise UserError(f"--split {split}: {source} has no such split; it holds {', '.join(splits)}")
    return splits[split]


def check_run_dataset(cfg: dict, dataset: str, run_dir: Path) -> None:
    """A run directory under <runs>/<dataset>/ holds a run of that dataset: refuse one whose config says otherwise."""
    if cfg.get("dataset") != dataset:
        raise UserError(f"{run_dir / 'config.yaml'} is a run of dataset {cfg.get('dataset')!r}, but the command "
                        f"names --dataset {dataset}; its results would be reported as {dataset}'s. Evaluate it "
                        f"with --dataset {cfg.get('dataset')} (and move the run under that dataset's folder).")


def provenance(run_dir: Path, checkpoint: str, saved: dict, dataset) -> dict:
    """What a result came from: the checkpoint (path, epoch, the run that wrote it) and the data file, for
    its result file; and, when the data is not what the run trained on, both files (`other_data`)."""
    origin = {"checkpoint": {"path": str(checkpoint_path(run_dir, checkpoint).resolve()), "epoch": saved["epoch"],
                             "run": saved.get("run")},
              "data": dataset.source, "split": dataset.split}
    other = run_identity.other_data_note(run_dir, dataset.source)
    if other is not None:
        origin["other_data"] = other
    return origin


def other_data_line(origin: dict) -> str | None:
    """The one line eval and analyze print when a provenance's data is not what the run trained on."""
    other = origin.get("other_data")
    if other is None:
        return None
    return (f"note: evaluating other data than the run trained on: {run_identity.describe(other['evaluated_on'])}, "
            f"trained on {run_identity.describe(other['trained_on'])}")


def result_tag(run_dir: Path, checkpoint: str, data_dir: str | None, source: dict, checkpoint_run: dict | None,
               data_file: str | None = None) -> str:
    """The name part of a result file: the checkpoint's name for the run's own checkpoint on its own data;
    otherwise also a digest of the checkpoint and data file, so a foreign evaluation never overwrites
    the run's own results (and two foreign ones of different origin never overwrite each other).

    Own checkpoint: in the run directory under a checkpoint name, and written by this run (`checkpoint_run`:
    the run identity the checkpoint records). Own data: the run's data folder or file (or none given),
    holding the content the run trained on."""
    path = checkpoint_path(run_dir, checkpoint).resolve()
    own_checkpoint = (path.parent == Path(run_dir).resolve() and path.name in ckpt_io.CHECKPOINT_NAMES.values()
                      and run_identity.belongs({"run": checkpoint_run}, path, run_identity.read_identity(run_dir)))
    run_data = ckpt_io.read_config_file(Path(run_dir) / "config.yaml")["data"]
    if data_file is not None:
        own_place = run_data["file"] is not None and Path(data_file).resolve() == Path(run_data["file"]).resolve()
    else:
        own_place = data_dir is None or Path(data_dir).resolve() == Path(run_data["dir"]).resolve()
    own_data = own_place and run_identity.other_data_note(run_dir, source) is None
    if own_checkpoint and own_data:
        return path.stem
    digest = hashlib.sha1(f"{path}\n{source['path']}\n{source.get('sha1')}".encode()).hexdigest()[:8]
    return f"{path.stem}-{digest}"
