"""Device choice and the little DistributedDataParallel plumbing the loop needs.

A run under `torchrun --nproc_per_node=N` sees WORLD_SIZE > 1 and joins a process group (NCCL on CUDA,
gloo on the CPU). Without torchrun everything here is a no-op with rank 0 of 1.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError

log = logging.getLogger("causalmer")


@dataclass(frozen=True)
class Context:
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when present, else cpu. Chosen once and passed down; nothing else picks a device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not a device this tool runs on; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for, but no CUDA device is available; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"numbered from 0")
    return device


def _env_int(name: str, default: str | None = None) -> int:
    raw = os.environ.get(name, default)
    if raw is None:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {name} is not: a distributed run needs "
                        "both (torchrun sets them); unset WORLD_SIZE to run in one process")
    try:
        value = int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None
    if value < 0:
        raise UserError(f"environment variable {name}={value} must be non-negative")
    return value


def setup(device_name: str = "auto") -> Context:
    world_size = _env_int("WORLD_SIZE", "1")
    if world_size <= 1:
        return Context(resolve_device(device_name))
    rank = _env_int("RANK")
    if rank >= world_size:
        raise UserError(f"RANK={rank} is not below WORLD_SIZE={world_size}")
    local_rank = _env_int("LOCAL_RANK", str(rank))
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend_for(device))
    return Context(device, rank, world_size)


def warn_if_amp_ignored(device: torch.device, amp: bool) -> None:
    """--amp asks for bf16 autocast, which runs on CUDA only: say so rather than ignore it silently."""
    if amp and device.type != "cuda":
        log.warning("--amp has no effect here: bf16 autocast runs on CUDA only; this run uses full float32 on %s",
                    device)


def backend_for(device: torch.device) -> str:
    """The process group backend for a device: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def teardown(ctx: Context) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def gather_objects(obj, ctx: Context) -> list:
    """Every rank's obj, in rank order, on every rank (a list of one without a process group)."""
    if not ctx.distributed:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()
