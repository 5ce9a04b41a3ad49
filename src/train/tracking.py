"""Watching a run: per-epoch scalars to TensorBoard (the optional `tensorboard` extra), or nowhere.

The logger is chosen once from `train.logger` (`none` | `tensorboard`) and only rank 0 gets a real
one. It reads the run's per-epoch history entries (src/train/loop.py), so what TensorBoard shows is
exactly what metrics.json keeps:

    train/loss, train/<term>          the training loss and its weighted parts (model.loss_terms)
    valid/loss, valid/<metric>/<p>    validation loss, headline metric of each prediction p (tie, te, m)
    lr/<group>                        every Adam parameter group's learning rate
    constant/c_t, c_a, c_v            the causal head's counterfactual constants
    margin/<key>                      decision margins on valid (src/eval/margins.py)
    time/epoch_seconds, time/samples_per_second
    test/<checkpoint>/<p>/<metric>    at the end, every test metric of best_loss and best_acc, at the
                                      step of the epoch the checkpoint was taken from

and the run's hyperparameters (the flattened config) with the two checkpoints' test headline
metrics in TensorBoard's hparams view. Event files go to <run>/tensorboard/.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..errors import ConfigError, UserError
from ..trees import flatten

LOGGERS = ("none", "tensorboard")
TENSORBOARD_HINT = "pip install -e .[tensorboard]"
LOG_DIR = "tensorboard"
CHECKPOINTS = ("best_loss", "best_acc")


def check_logger(name: str) -> str:
    if name not in LOGGERS:
        raise ConfigError(f"train.logger '{name}' is unknown; valid loggers: {', '.join(LOGGERS)}")
    return name


def epoch_scalars(entry: dict) -> dict:
    """{tag: value} of one history entry (see the module docstring for the tags)."""
    scalars = {"train/loss": entry["train_loss"], "valid/loss": entry["valid_loss"]}
    for term, value in entry.get("train_terms", {}).items():
        scalars[f"train/{term}"] = value
    for metric, by_prediction in entry.get("valid_scores", {}).items():
        for prediction, value in by_prediction.items():
            scalars[f"valid/{metric}/{prediction}"] = value
    for group, value in entry.get("lrs", {}).items():
        scalars[f"lr/{group}"] = value
    for name, value in (entry.get("constants") or {}).items():
        scalars[f"constant/{name}"] = value
    for name, value in (entry.get("margins") or {}).items():
        scalars[f"margin/{name}"] = value
    scalars["time/epoch_seconds"] = entry["seconds"]
    if "samples_per_second" in entry:
        scalars["time/samples_per_second"] = entry["samples_per_second"]
    return scalars


def final_scalars(results: dict) -> list[tuple[str, float, int]]:
    """(tag, value, step) of every test metric of both selected checkpoints in a metrics.json dict."""
    rows = []
    for which in CHECKPOINTS:
        entry = results[which]
        for prediction, values in entry["test"]["predictions"].items():
            for metric, value in values.items():
                rows.append((f"test/{which}/{prediction}/{metric}", value, entry["epoch"]))
        rows.append((f"test/{which}/loss", entry["test"]["loss"], entry["epoch"]))
    return rows


def flat_hparams(cfg: dict) -> dict:
    """A nested config as {dotted key: int | float | str | bool}, the types the hparams view takes
    (None and lists as their text)."""
    return {key: value if isinstance(value, (bool, int, float, str)) else str(value)
            for key, value in flatten(cfg).items()}


class NullLogger:
    """Logs nothing: `train.logger: none`, and every rank but 0."""

    def log_epoch(self, entry: dict) -> None:
        pass

    def log_final(self, results: dict, cfg: dict, headline_key: str) -> None:
        pass

    def close(self) -> None:
        pass


def require_logger(name: str) -> None:
    """Refuse a logger whose package is missing, before anything is written (UserError naming the extra)."""
    if check_logger(name) == "tensorboard":
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it; fail here with a hint)
        except ImportError:
            raise UserError(f"--logger tensorboard (train.logger) needs the tensorboard package, which is "
                            f"not installed; install the tensorboard extra: {TENSORBOARD_HINT}") from None


class TensorBoardLogger:
    def __init__(self, log_dir: Path, purge_step: int | None = None):
        require_logger("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        # On resume, events at or after the resumed epoch (written by the interrupted run) are dropped.
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def log_epoch(self, entry: dict) -> None:
        for tag, value in epoch_scalars(entry).items():
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, entry["epoch"])
        self.writer.flush()

    def log_final(self, results: dict, cfg: dict, headline_key: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        for tag, value, step in final_scalars(results):
            if value is not None and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        # The hparams view pairs the config with metrics logged as scalars under the same tags.
        metrics = {}
        for which in CHECKPOINTS:
            for prediction, values in results[which]["test"]["predictions"].items():
                metrics[f"hparam/{which}/{prediction}_{headline_key}"] = values[headline_key]
        experiment, start, end = hparams(flat_hparams(cfg), metrics)
        for summary in (experiment, start, end):
            self.writer.file_writer.add_summary(summary)
        last = max(results[which]["epoch"] for which in CHECKPOINTS)
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, last)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_logger(name: str, run_dir: Path, is_main: bool, first_epoch: int = 1):
    """The run's logger: a TensorBoard writer in <run>/tensorboard on rank 0, else a NullLogger."""
    check_logger(name)
    if name == "none" or not is_main:
        return NullLogger()
    return TensorBoardLogger(Path(run_dir) / LOG_DIR, purge_step=first_epoch if first_epoch > 1 else None)
