"""Writing files so that a kill or a full disk never leaves a torn one: the one writer every file goes through.

    with replacing(path) as tmp:      # write tmp however you like (torch.save, np.save, open_memmap ...)
        torch.save(state, tmp)
    write_bytes(path, payload); write_text(path, text)

The content goes to a hidden temporary file in the target's directory, is fsynced, then renamed over the
target. A rename within one filesystem is atomic, so a reader sees the old file or the new one, never a
mix. If writing fails the temporary is removed; an OSError (a full disk, a read-only directory) becomes a
UserError naming the file. A process killed mid-write cannot clean up after itself, so its temporary is
left behind: remove_stale_temporaries() deletes those of writers that are gone.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import time
from pathlib import Path

from .errors import UserError

# A temporary untouched for this long is stale whoever wrote it (its process id may be reused by now).
STALE_TMP_SECONDS = 3600
# `.name.<pid>.tmp`; `.name.tmp<pid>` is what earlier versions of the checkpoint writer left.
_TMP_PATTERN = re.compile(r"^\..+\.(\d+)\.tmp$|^\..+\.tmp(\d+)$")


def temporary_name(target: Path) -> Path:
    # Hidden, ending in .tmp and carrying the writer's process id: never mistaken for the file itself, two
    # processes writing at once don't share one, and a dead writer's leftover can be recognised.
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}.tmp")


def write_error(target: Path, err: OSError) -> UserError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return UserError(f"cannot write {target}: no space left on the device (or the disk quota is used up). "
                         "Nothing was replaced; free some space and run the command again.")
    reason = err.strerror or str(err)
    return UserError(f"cannot write {target}: {reason}. Nothing was replaced; check that the folder exists "
                     "and is writable.")


@contextlib.contextmanager
def replacing(target: Path):
    """Yield a temporary path to write; on success it replaces `target`, on any failure it is removed."""
    target = Path(target)
    tmp = temporary_name(target)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):
            raise write_error(target, err) from None
        raise
    _fsync_directory(target.parent)


def write_bytes(target: Path, payload: bytes) -> None:
    with replacing(target) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(payload)


def write_text(target: Path, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))


def _fsync_directory(directory: Path) -> None:
    # Makes the rename itself durable; some filesystems cannot open or fsync a directory, which is harmless.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _writer_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists but belongs to someone else
        return True
    return True


def remove_stale_temporaries(directory: Path, max_age: float = STALE_TMP_SECONDS) -> list[Path]:
    """Delete the temporaries in `directory` left by killed writes; return what was removed.

    One is stale when the process named in it no longer runs here, or when it is older than max_age (the
    process id may have been reused since); this process's own are never touched."""
    removed = []
    directory = Path(directory)
    if not directory.is_dir():
        return removed
    cutoff = time.time() - max_age
    for path in directory.iterdir():
        match = _TMP_PATTERN.match(path.name)
        if match is None or not path.is_file():
            continue
        pid = int(match.group(1) or match.group(2))
        if pid == os.getpid():  # a write of this very process, in progress
            continue
        try:
            if not _writer_alive(pid) or path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except OSError:
            continue
    return removed
