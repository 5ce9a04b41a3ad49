"""Watching a run: per-epoch scalars to TensorBoard (the optional `tensorboard` extra), to Weights & Biases
(the optional `wandb` extra), or nowhere.

The logger is chosen once from `train.logger` (`none` | `tensorboard` | `wandb`) and only rank 0 gets a
real one. It reads the run's per-epoch history entries (src/train/loop.py), so what TensorBoard shows is
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

A TensorBoard folder that cannot be written is refused before the run starts; a write that fails during
the run (a full disk) stops it with a message, after cutting the events file back to its last complete
flush, so no torn record is left (the epoch's checkpoints are already saved: --resume continues).

W&B gets the same scalars under the same names (the final test metrics in the run's summary, the config
as the run's config), offline by default: the files go to <run>/wandb/ and `wandb sync <run>/wandb/offline-run-*`
uploads them later. Set WANDB_MODE=online to log live. Values are as metrics.json stores them
(accuracies and F1 as fractions).
"""
from __future__ import annotations

import contextlib
import errno
import math
import os
import threading
from pathlib import Path

from ..errors import UserError
from ..run.config import check_setting
from ..trees import flatten

TENSORBOARD_HINT = "pip install -e .[tensorboard]"
WANDB_HINT = "pip install -e .[wandb]"
LOG_DIR = "tensorboard"
WANDB_DIR = "wandb"
CHECKPOINTS = ("best_loss", "best_acc")


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


def require_logger(name: str, run_dir: Path | None = None) -> None:
    """Refuse a logger whose package is missing, or whose folder in `run_dir` cannot be written, before
    anything is written (UserError naming the extra or the folder)."""
    name = check_setting("train.logger", name)
    if name == "wandb":
        try:
            import wandb  # noqa: F401  (optional dependency: fail here, before the run starts, with a hint)
        except ImportError:
            raise UserError(f"--logger wandb (train.logger) needs the wandb package, which is not installed; "
                            f"install the wandb extra: {WANDB_HINT}") from None
    if name == "tensorboard":
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it; fail here with a hint)
        except ImportError:
            raise UserError(f"--logger tensorboard (train.logger) needs the tensorboard package, which is "
                            f"not installed; install the tensorboard extra: {TENSORBOARD_HINT}") from None
        if run_dir is not None:
            check_log_dir(Path(run_dir) / LOG_DIR)


def check_log_dir(log_dir: Path) -> None:
    """The TensorBoard folder is absent (it is created) or a folder this process can write into."""
    if log_dir.exists() and not log_dir.is_dir():
        raise UserError(f"{log_dir} is a file, but --logger tensorboard (train.logger) writes its event files into "
                        "a folder there; move the file away, or train with --logger none")
    if log_dir.is_dir() and not os.access(log_dir, os.W_OK | os.X_OK):
        raise UserError(f"the TensorBoard folder {log_dir} is not writable; make it writable, or train with "
                        "--logger none")


def logging_error(log_dir: Path, err: OSError) -> UserError:
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    reason = "no space left on the device (or the disk quota is used up)" if full else (err.strerror or str(err))
    return UserError(f"cannot write the TensorBoard events in {log_dir}: {reason}. The run stopped; its checkpoints "
                     "of the last finished epoch are kept and the events file holds only complete records. "
                     f"{'Free some space' if full else 'Fix the folder'} and continue with --resume (the same "
                     "command; or --logger none to train without TensorBoard).")


def _quiet_writer_threads() -> None:
    """TensorBoard writes from a thread, which keeps its error (a full disk) and re-raises it in the thread that
    writes next, where it becomes our message; Python would also print the writer thread's traceback."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and issubclass(args.exc_type, OSError):
            return
        previous(args)

    hook.quiets_tensorboard = True
    threading.excepthook = hook


class TensorBoardLogger:
    def __init__(self, log_dir: Path, purge_step: int | None = None):
        require_logger("tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        _quiet_writer_threads()
        self.log_dir, self.writer, self.events, self.complete = Path(log_dir), None, None, 0
        before = set(self.log_dir.glob("events.out.tfevents.*"))
        with self.writing():
            # On resume, events at or after the resumed epoch (written by the interrupted run) are dropped.
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)
            self.events = next(iter(set(self.log_dir.glob("events.out.tfevents.*")) - before), None)
            self.flush()

    def flush(self) -> None:
        """Flush, and note the events file's size: everything up to there is complete records."""
        self.writer.flush()
        if self.events is not None:
            self.complete = self.events.stat().st_size

    @contextlib.contextmanager
    def writing(self):
        try:
            yield
        except OSError as err:
            self.abandon()
            raise logging_error(self.log_dir, err) from None

    def abandon(self) -> None:
        """After a failed write: close the writer quietly and cut the events file back to its last complete flush."""
        if self.writer is not None:
            with contextlib.suppress(Exception):
                self.writer.close()
        if self.events is not None:
            with contextlib.suppress(OSError):
                os.truncate(self.events, self.complete)

    def log_epoch(self, entry: dict) -> None:
        with self.writing():
            for tag, value in epoch_scalars(entry).items():
                if value is not None and math.isfinite(value):
                    self.writer.add_scalar(tag, value, entry["epoch"])
            self.flush()

    def log_final(self, results: dict, cfg: dict, headline_key: str) -> None:
        with self.writing():
            self._log_final(results, cfg, headline_key)

    def _log_final(self, results: dict, cfg: dict, headline_key: str) -> None:
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
        self.flush()

    def close(self) -> None:
        with self.writing():
            self.writer.close()


class WandbLogger:
    """The same scalars as TensorBoardLogger, to a W&B run kept in <run>/wandb (offline unless WANDB_MODE
    says otherwise). A resumed run continues the same W&B run: its id is the run directory's name path."""

    def __init__(self, run_dir: Path, cfg: dict):
        require_logger("wandb")
        import os

        import wandb  # optional dependency (the wandb extra), checked above

        run_dir = Path(run_dir)
        (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        run_id = "-".join(run_dir.resolve().parts[-3:])  # <dataset>-<name>-seed<k>
        self.run = wandb.init(project="causalmer", name=run_id, id=run_id, resume="allow",
                              dir=str(run_dir / WANDB_DIR), config=flat_hparams(cfg),
                              mode=os.environ.get("WANDB_MODE", "offline"))

    def log_epoch(self, entry: dict) -> None:
        self.run.log({tag: value for tag, value in epoch_scalars(entry).items()
                      if value is not None and math.isfinite(value)}, step=entry["epoch"])

    def log_final(self, results: dict, cfg: dict, headline_key: str) -> None:
        for tag, value, _ in final_scalars(results):
            if value is not None and math.isfinite(value):
                self.run.summary[tag] = value

    def close(self) -> None:
        self.run.finish()


def make_logger(name: str, run_dir: Path, is_main: bool, first_epoch: int = 1, cfg: dict | None = None):
    """The run's logger on rank 0 (TensorBoard in <run>/tensorboard, W&B in <run>/wandb), else a NullLogger."""
    check_setting("train.logger", name)
    if name == "none" or not is_main:
        return NullLogger()
    if name == "wandb":
        return WandbLogger(run_dir, cfg or {})
    return TensorBoardLogger(Path(run_dir) / LOG_DIR, purge_step=first_epoch if first_epoch > 1 else None)
