"""Process-wide malloc settings (src/run/runtime.py)."""
import ctypes
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from src.run import runtime

REPO = Path(__file__).resolve().parents[1]
ON_GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# Prints how many bytes of a fresh 64 MiB tensor glibc served from mmap'd chunks (mallinfo2's hblkhd),
# in a new process, with (`on`) or without (`off`) the settings. 64 MiB is above glibc's largest dynamic
# mmap threshold, so by default the block is always mmap'd, and unmapped again when freed.
MMAPPED_BYTES = """
import ctypes, sys
import torch
from src.run import runtime
if sys.argv[1] == "on":
    assert runtime.keep_freed_memory()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
before = libc.mallinfo2().hblkhd
block = torch.empty(64 << 20, dtype=torch.uint8).fill_(1)
print(libc.mallinfo2().hblkhd - before)
"""


def test_keep_freed_memory_applies_on_glibc_and_is_harmless_to_repeat():
    applied = runtime.keep_freed_memory()
    assert applied is ON_GLIBC
    assert runtime.keep_freed_memory() is applied


@pytest.mark.skipif(not ON_GLIBC or not hasattr(ctypes.CDLL("libc.so.6" if ON_GLIBC else None), "mallinfo2"),
                    reason="glibc >= 2.33 only (mallinfo2)")
def test_keep_freed_memory_serves_large_tensors_from_the_reusable_heap():
    def mmapped(setting):
        done = subprocess.run([sys.executable, "-c", MMAPPED_BYTES, setting], cwd=REPO, capture_output=True,
                              text=True, check=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
        return int(done.stdout.split()[-1])

    assert mmapped("off") >= 64 << 20  # the default: a fresh mapping, unmapped on free
    assert mmapped("on") == 0          # with the settings: a heap block, reused by the next tensor


def test_keep_freed_memory_changes_nothing_without_glibc(monkeypatch):
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))
    assert runtime.keep_freed_memory() is False
    monkeypatch.setattr(runtime.platform, "system", lambda: "Darwin")
    assert runtime.keep_freed_memory() is False


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_keep_freed_memory_reports_a_failing_mallopt(monkeypatch):
    class FakeLibc:
        class mallopt:  # noqa: N801 - mimics the ctypes function object
            argtypes = restype = None

            def __new__(cls, parameter, value):
                return 0

    monkeypatch.setattr(runtime.ctypes, "CDLL", lambda name: FakeLibc)
    assert runtime.keep_freed_memory() is False


def test_console_lines_follow_sys_stdout_when_it_is_replaced(monkeypatch):
    """A notebook or test harness may swap sys.stdout after logging was set up (and close the old one)."""
    import io
    import logging

    from src.run.runtime import setup_logging

    first = io.StringIO()
    monkeypatch.setattr(sys, "stdout", first)
    setup_logging()
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stdout", second)
    logging.getLogger("causalmer").info("after the swap")
    assert second.getvalue() == "after the swap\n"
    setup_logging()  # bound to the real stdout again (monkeypatch restores it after the test)
