"""Process-wide settings, applied by the command line (or a notebook) before any work: where log lines
go, and how malloc keeps freed memory.

Logging: messages go to the console as plain lines; a training run also keeps them, timestamped, in
its train.log. Only the main process of a distributed run writes them (the others warn only).

Malloc, for CPU training:

PyTorch's CPU allocator does not cache: every tensor is a malloc, and is freed when its last user is
done. glibc serves large requests (above an adaptive threshold, 128 KiB at start) with fresh mmap'd
pages and unmaps them on free, so the next step's tensor of the same size faults in every 4 KiB page
again. A training step on small batches makes hundreds of such temporaries, and where the adaptive
threshold settles differs from one process to the next, and so did the time of the same training step.
Serving large blocks from the heap and trimming only when much is free lets freed blocks be reused,
which makes the step both faster and steadier across processes (figures in the README's speed notes).
Peak memory is what the run needs at its peak either way; the heap just doesn't shrink right after it.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import platform
import sys
from pathlib import Path


class ConsoleHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a line is logged: a notebook or a test harness may replace
    sys.stdout after logging was set up, and a handler bound to the old, closed stream would fail."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stdout
        super().emit(record)


def setup_logging(log_file: Path | None = None, main_process: bool = True) -> None:
    """Console lines (INFO on the main process, WARNING on the others), and `log_file` if given."""
    root = logging.getLogger()
    for handler in root.handlers:
        handler.close()  # a previous run's train.log
    root.handlers.clear()
    root.setLevel(logging.INFO if main_process else logging.WARNING)
    console = ConsoleHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if log_file is not None and main_process:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


# glibc's mallopt parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 256 << 20  # blocks up to this size come from the reusable heap
TRIM_THRESHOLD_BYTES = 512 << 20  # free memory at the heap's top returns to the OS above this


def keep_freed_memory() -> bool:
    """Apply the settings above where the C library is glibc; return whether they were applied.

    Elsewhere (macOS, musl, Windows) it changes nothing: those allocators have their own policies.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # mallopt returns 1 on success, 0 on error
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
