"""Process-wide malloc settings (src/train/runtime.py)."""
import platform

import pytest
import torch

from src.train import runtime


def test_keep_freed_memory_applies_on_glibc_and_is_harmless_to_repeat():
    applied = runtime.keep_freed_memory()
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied is True
    else:
        assert applied is False
    assert runtime.keep_freed_memory() is applied
    # large tensors still allocate, fill and free normally afterwards
    big = torch.ones(64 << 20, dtype=torch.uint8)
    assert int(big.sum()) == 64 << 20


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
