"""The one atomic writer: all or nothing, a full disk is a clear error, dead writers' temporaries are removed."""
import errno
import os
import subprocess
import sys
import time

import pytest
import torch

from src import atomic
from src.errors import UserError
from src.run import checkpoint as ckpt_io


def _temporaries(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp") or ".tmp" in p.name)


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    atomic.write_text(target, "new")
    assert target.read_text() == "new"
    assert _temporaries(tmp_path) == []


@pytest.mark.parametrize("code, fragment", [(errno.ENOSPC, "no space left"), (errno.EACCES, "Permission denied")])
def test_failed_write_keeps_the_old_file_removes_the_temporary_and_names_the_path(tmp_path, code, fragment):
    target = tmp_path / "last.pt"
    target.write_bytes(b"previous checkpoint")
    with pytest.raises(UserError) as error:
        with atomic.replacing(target) as tmp:
            tmp.write_bytes(b"half of it")  # the disk fills after part of the file is written
            raise OSError(code, os.strerror(code))
    message = str(error.value)
    assert str(target) in message and fragment in message, message
    assert target.read_bytes() == b"previous checkpoint"
    assert _temporaries(tmp_path) == []


def test_full_disk_during_a_checkpoint_save(tmp_path, monkeypatch):
    def full_disk(obj, f, *args, **kwargs):  # f: the open temporary file, as atomic_save hands it over
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(UserError, match="no space left"):
        ckpt_io.atomic_save({"model": {}}, tmp_path / "best_acc.pt")
    assert list(tmp_path.iterdir()) == []


def test_other_exceptions_pass_through_and_still_clean_up(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic.replacing(tmp_path / "x.json") as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_of_dead_or_old_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # that process has exited
    stale = tmp_path / f".last.pt.{dead_pid}.tmp"
    old_style = tmp_path / f".best_acc.pt.tmp{dead_pid}"
    mine = tmp_path / f".metrics.json.{os.getpid()}.tmp"  # a write in progress in this process
    old_live = tmp_path / f".config.yaml.{os.getppid()}.tmp"  # alive, but untouched for hours: pid reused
    unrelated = tmp_path / "notes.tmp"
    for path in (stale, old_style, mine, old_live, unrelated):
        path.write_text("x")
    hour_ago = time.time() - 2 * atomic.STALE_TMP_SECONDS
    os.utime(old_live, (hour_ago, hour_ago))
    removed = atomic.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted([stale.name, old_style.name, old_live.name])
    assert mine.exists() and unrelated.exists()
