"""A run directory: whether it already holds a run, and one process at a time writing into it.

A directory holds a run once its first epoch has ended, i.e. once it has a checkpoint (or the results
of one). Before that it holds at most a config.yaml and a train.log of an attempt that failed or was
killed, and starting the run again simply replaces them.

Training holds an exclusive lock on the directory's `.lock` file for the whole run, and an evaluation
that writes its results into the directory holds it while it runs, so a second process is refused
instead of interleaving the log and overwriting checkpoints. The lock is an advisory `flock`: the OS
releases it when its process ends, however it ends, so a killed run never leaves its directory locked.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks, so concurrent writers are not detected there
    fcntl = None

from src.errors import UserError
from src.train.checkpoint import CHECKPOINT_NAMES

LOCK_NAME = ".lock"
METRICS_NAME = "metrics.json"
SEED_RANGE = (0, 2**32 - 1)  # what numpy's global seeding accepts


def check_seed(seed: int) -> None:
    low, high = SEED_RANGE
    if not low <= seed <= high:
        raise UserError(f"--seed must be between {low} and {high} (2^32 - 1), got {seed}")


def holds_run(run_dir: Path) -> bool:
    """True once the directory has a checkpoint or the metrics of a finished run."""
    run_dir = Path(run_dir)
    return any((run_dir / name).is_file() for name in (*CHECKPOINT_NAMES.values(), METRICS_NAME))


def in_use_error(run_dir: Path) -> UserError:
    return UserError(f"run directory {run_dir} is in use by another process (a training run, or an evaluation "
                     "writing its results there); wait until it ends, or use another --name or --seed")


def refuse_if_in_use(run_dir: Path) -> None:
    """Refuse now, without taking the lock, if another process holds it (so the message is the right one)."""
    lock = Path(run_dir) / LOCK_NAME
    if fcntl is None or not lock.is_file():
        return
    try:
        handle = open(lock, "rb")
    except OSError:
        return  # exclusive() reports what is wrong with the directory
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise in_use_error(run_dir) from None


@contextlib.contextmanager
def exclusive(run_dir: Path):
    """Hold the run directory's lock (creating the directory) or refuse, naming it, if another process has it."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_NAME, "a+b")
    except OSError as err:
        raise UserError(f"cannot create or write the run directory {run_dir}: {err.strerror or err}") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise in_use_error(run_dir) from None
        yield run_dir
    finally:
        handle.close()  # closing the file releases the lock
