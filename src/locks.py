"""Advisory file locks (`flock`): one process at a time in a run directory, or building a data cache.

The OS releases a process's locks when it ends, however it ends, so a killed process never leaves a
lock behind. Windows has no `fcntl`: there nothing is locked, and concurrent writers go undetected.
"""
from __future__ import annotations

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def lock(handle, wait: bool = True, shared: bool = False) -> bool:
    """Lock the open file `handle` (exclusively, or `shared`) until it is closed. With `wait`, block until
    it is free; without, return False at once if another process holds it. True once held (and where
    there are no locks)."""
    if fcntl is None:
        return True
    flags = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    try:
        fcntl.flock(handle, flags)
    except BlockingIOError:
        return False
    return True
