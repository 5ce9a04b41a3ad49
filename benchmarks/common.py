"""What every benchmark script records beside its numbers: the machine, the time, peak memory, and how
numbers are printed in the markdown tables."""
from __future__ import annotations

import datetime
import math
import os
import platform
import resource
import sys

import numpy
import torch

GB = 1e9


def machine_info(device: str = "cpu", **extra) -> dict:
    """The machine a result was measured on: platform, CPU, memory, Python, torch, numpy, the load
    average now, and the GPU when `device` is a CUDA one. `extra` adds what the benchmark itself sets
    (its torch threads, ...)."""
    info = {"platform": platform.platform(), "processor": cpu_name() or platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": numpy.__version__, "device": device, "loadavg_start": list(os.getloadavg())}
    try:
        info["memory_gb"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    except (ValueError, OSError, AttributeError):  # no sysconf names for it on this platform
        pass
    if device.startswith("cuda"):
        chosen = torch.device(device)
        info.update(cuda=torch.version.cuda, gpus=torch.cuda.device_count(),
                    cuda_device=torch.cuda.get_device_name(chosen),
                    capability=".".join(map(str, torch.cuda.get_device_capability(chosen))))
    return {**info, **extra}


def cpu_name() -> str | None:
    """The CPU's model name from /proc/cpuinfo (Linux); None elsewhere."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def peak_rss_gb() -> float:
    """This process's peak resident memory so far."""
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is in KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / GB


def fmt(value, digits: int = 2) -> str:
    """A number for a markdown table; "-" for a missing or non-finite one."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"
