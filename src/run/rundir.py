"""A run directory: whether it already holds a run, and one process at a time writing into it.

A directory holds a run once its first epoch has ended, i.e. once it has `last.pt` (written last at the
end of every epoch, so it is what --resume continues from) or the metrics of a finished run. Before that
it holds at most a config.yaml, a train.log and the best-epoch checkpoints of an attempt that failed or
was killed during its first epoch; it cannot be resumed, and starting the run again replaces them.

Training holds an exclusive lock on the directory's `.lock` file for the whole run, and an evaluation
that writes its results into the directory holds it while it runs, so a second process is refused
instead of interleaving the log and overwriting checkpoints. The lock is an advisory `flock`: the OS
releases it when its process ends, however it ends, so a killed run never leaves its directory locked.
Moving a run aside (compare/demo --fresh) takes the same lock, so a run being trained is never moved.
"""
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from ..errors import UserError
from ..locks import lock
from .checkpoint import CHECKPOINT_NAMES

LOCK_NAME = ".lock"
METRICS_NAME = "metrics.json"
# What `import-checkpoint` writes beside the imported weights: which file they came from.
IMPORTED_NAME = "imported.json"


# The longest name most file systems take for one folder (ext4, APFS, NTFS: 255 bytes or UTF-16 units).
MAX_NAME_BYTES = 255


def check_run_name(name: str) -> str:
    """A run name is one folder name inside --runs-dir: no separators, no '..', not absolute, not longer than
    a file system takes."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name or Path(name).is_absolute():
        raise UserError(f"--name {name!r} must be a plain folder name (letters, digits, '_', '-', '.'), without "
                        "'/' or '..': runs live in <runs-dir>/<dataset>/<name>/seed<seed>/")
    if "\0" in name:
        raise UserError(f"--name {name!r} holds a NUL character, which no file system takes in a folder name")
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        raise UserError(f"--name {name[:40]!r}... is {len(os.fsencode(name))} bytes long; a folder name may have at "
                        f"most {MAX_NAME_BYTES} bytes: choose a shorter --name")
    return name


def run_path(runs_dir, dataset: str, name: str, seed: int) -> Path:
    """Where a run lives: <runs_dir>/<dataset>/<name>/seed<seed>/."""
    return Path(runs_dir) / dataset / check_run_name(name) / f"seed{seed}"


def holds_run(run_dir: Path) -> bool:
    """True once the directory has last.pt, the metrics of a finished run, or an imported model."""
    run_dir = Path(run_dir)
    return any((run_dir / name).is_file() for name in (CHECKPOINT_NAMES["last"], METRICS_NAME, IMPORTED_NAME))


def in_use_error(run_dir: Path) -> UserError:
    return UserError(f"run directory {run_dir} is in use by another process (a training run, or an evaluation "
                     "writing its results there); wait until it ends, or use another --name or --seed")


def refuse_if_in_use(run_dir: Path) -> None:
    """Refuse now, without taking the lock, if another process holds it (so the message is the right one)."""
    lock_file = Path(run_dir) / LOCK_NAME
    if not lock_file.is_file():
        return
    try:
        handle = open(lock_file, "rb")
    except OSError:
        return  # exclusive() reports what is wrong with the directory
    with handle:
        if not lock(handle, wait=False, shared=True):
            raise in_use_error(run_dir)


@contextlib.contextmanager
def exclusive(run_dir: Path):
    """Hold the run directory's lock (creating the directory) or refuse, naming it, if another process has it."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / LOCK_NAME, "a+b")
    except OSError as err:
        raise UserError(f"cannot create the run directory {run_dir} (or write its lock file): {err.strerror or err}; "
                        "is the runs folder (--runs-dir) a writable folder?") from None
    with handle:  # closing the file releases the lock
        if not lock(handle, wait=False):
            raise in_use_error(run_dir)
        yield run_dir


def set_aside(run_dir: Path) -> Path:
    """Move a run out of the way, beside its siblings but out of reach of the seed* pattern, holding its
    lock: a run that another process is training (or evaluating into) is refused, naming it, not moved."""
    run_dir = Path(run_dir)
    target = run_dir.parent / "replaced" / f"{run_dir.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    refuse_if_in_use(run_dir)  # before creating anything
    with exclusive(run_dir):
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            run_dir.rename(target)
        except OSError as err:
            raise UserError(f"cannot move the run {run_dir} aside to {target}: {err.strerror or err}") from None
    return target
