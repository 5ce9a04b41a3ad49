"""What a run is bound to: an id drawn when the run is created, its seed and the data file it trains on.

The identity is written to <run>/run.json when the run is created and into every checkpoint the run
writes (under "run"), so that
  - --resume refuses a data file whose content changed since the run started (same path, other file);
  - a checkpoint copied in from another run is not taken for the run's own (its id differs);
  - an evaluation on other data than the run trained on says so and records it.
The data is compared by content (size and the fingerprint of its first and last MiB, src/data/cache.py),
not by path or modification time: a copy of the same file elsewhere is the same data.
Runs and checkpoints written before identities existed still load; they are warned about once.
"""
from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

from ..atomic import write_text
from ..errors import ConfigError, CheckpointError, DataError

log = logging.getLogger("causalmer")
RUN_FILE = "run.json"
CONTENT_KEYS = ("size", "sha1")  # what identifies a data file's content in its fingerprint (dataset.source)
_warned = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def new_identity(seed: int, source: dict | None, engine: str | None = None) -> dict:
    """A fresh run's identity; `source` is the data file's fingerprint (None for an imported model);
    `engine` the encoders' engine the run trains with, as resolved on its device ("auto" is resolved)."""
    return {"run_id": uuid.uuid4().hex, "seed": int(seed), "data": source, "engine": engine}


def write_identity(run_dir: Path, identity: dict) -> None:
    write_text(Path(run_dir) / RUN_FILE, json.dumps(identity, indent=2))


def read_identity(run_dir: Path) -> dict | None:
    """The run's identity, or None for a run written before identities existed (warned about once)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        warn_once(str(path), f"{run_dir} has no {RUN_FILE} (a run written by an earlier version): its checkpoints "
                  "and data cannot be checked against the run they belong to")
        return None
    try:
        identity = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not readable run identity JSON ({err}); it records which run, seed and "
                              "data file this directory holds") from None
    if not isinstance(identity, dict) or not isinstance(identity.get("run_id"), str):
        raise CheckpointError(f"{path} is not a run identity of this tool: it lacks a 'run_id' string")
    return identity


def describe(source: dict | None) -> str:
    if not source:
        return "unknown"
    return f"{source.get('path')} (size {source.get('size')}, sha1 {source.get('sha1')})"


def same_data(a: dict | None, b: dict | None) -> bool:
    """True unless both fingerprints are known and their contents differ."""
    if not a or not b:
        return True
    return all(a.get(key) == b.get(key) for key in CONTENT_KEYS)


def bind_run(run_dir: Path, seed: int, source: dict, resume: bool, engine: str | None = None) -> dict | None:
    """The identity a run's checkpoints carry: a new one written to run.json, or the resumed run's."""
    if resume:
        identity = read_identity(run_dir)
        if identity is not None:
            check_resume_data(run_dir, source)
            check_resume_engine(run_dir, engine)
            return identity
    identity = new_identity(seed, source, engine)
    write_identity(run_dir, identity)
    return identity


def check_resume_data(run_dir: Path, source: dict) -> None:
    """Refuse to resume on a data file whose content differs from the one the run started on."""
    identity = read_identity(run_dir)
    trained = identity.get("data") if identity else None
    if not same_data(trained, source):
        raise DataError(f"--resume: the run in {run_dir} started on {describe(trained)}, but the data file is now "
                        f"{describe(source)}; its earlier epochs trained on other data, so the run cannot continue "
                        "on this file. Restore the original file, or start a new run under another --name.")


def check_resume_engine(run_dir: Path, engine: str | None) -> None:
    """Refuse to resume with another resolved engine: "auto" is "fast" on a CPU and "plain" elsewhere, so a
    run started on one kind of device and resumed on another would switch its dropout draws unseen."""
    identity = read_identity(run_dir)
    trained = identity.get("engine") if identity else None
    if trained is not None and engine is not None and trained != engine:
        raise ConfigError(f"--resume: the run in {run_dir} trained its encoders with the {trained!r} engine, and "
                          f"here they would run with {engine!r} (engine 'auto' picks by device); the dropout draws "
                          f"would change mid-run. Resume it on the kind of device it started on (auto is 'fast' on a CPU, "
                          "'plain' on a GPU), or set the engine explicitly when starting a run that moves between them.")


def checkpoint_identity(ckpt: dict, path: Path) -> dict | None:
    """The identity inside a checkpoint, or None for one written before identities existed (warned once)."""
    identity = ckpt.get("run")
    if identity is None:
        warn_once(str(path), f"checkpoint {path} was written by an earlier version and does not record its run; "
                  "it is taken for the run's own")
        return None
    if not isinstance(identity, dict) or not isinstance(identity.get("run_id"), str):
        raise CheckpointError(f"checkpoint {path} is not a checkpoint of this tool: its 'run' record lacks a "
                              "'run_id' string")
    return identity


def belongs(ckpt: dict, path: Path, run_identity: dict | None) -> bool:
    """Whether a checkpoint is the run's own (True when either side predates identities)."""
    own = checkpoint_identity(ckpt, path)
    return own is None or run_identity is None or own["run_id"] == run_identity["run_id"]


def check_own_checkpoint(ckpt: dict, path: Path, run_dir: Path, which: str, run_identity: dict | None) -> None:
    """Refuse a checkpoint that sits in the run directory under the run's own name but came from another run."""
    if belongs(ckpt, path, run_identity):
        return
    other = ckpt["run"]
    raise CheckpointError(
        f"checkpoint {path} belongs to another run (seed {other.get('seed')}, data {describe(other.get('data'))}), "
        f"not to the run in {run_dir} (seed {run_identity.get('seed')}, data {describe(run_identity.get('data'))}); "
        f"it is not evaluated as the run's {which}. To evaluate it anyway, move it out of the run directory and "
        "pass it as a foreign checkpoint with --checkpoint FILE, which writes its own result files.")


def other_data_note(run_dir: Path, source: dict) -> dict | None:
    """{trained_on, evaluated_on} when `source` is not the data the run trained on, else None."""
    identity = read_identity(run_dir)
    trained = identity.get("data") if identity else None
    if same_data(trained, source):
        return None
    return {"trained_on": trained, "evaluated_on": source}
