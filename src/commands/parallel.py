"""Independent training runs in parallel processes (compare --jobs N).

Each run is its own `main.py train` process, so it takes the same per-run lock, writes the same files and
computes the same numbers as when it runs alone; nothing is shared but the machine. On GPUs the runs are
dealt out over the given devices in turn; on the CPU the cores are shared out, each process getting
cores // jobs threads (a process with every core, N times over, would be slower than one at a time).
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import UserError


def parse_devices(text: str | None) -> list[str]:
    """'cuda:0,cuda:1' -> ['cuda:0', 'cuda:1']; None -> []."""
    if text is None:
        return []
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise UserError(f"--devices {text!r} names no device; give a comma-separated list such as cuda:0,cuda:1")
    return devices


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    """CPU threads for each of `jobs` processes sharing `cores` (default: this machine's)."""
    cores = cores or os.cpu_count() or 1
    return max(1, cores // jobs)


def job_environment(threads: int) -> dict:
    # torch reads these when it starts: the process's share of the cores.
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_jobs(program: list[str], jobs: list[tuple[str, list[str]]], parallel: int, devices: list[str]) -> None:
    """Run each (label, arguments) as `program + arguments`, at most `parallel` at a time; the i-th job gets
    `--device devices[i % len(devices)]` when devices are given. Every job runs to its end; then a
    failed one is a UserError quoting the end of its output (its own message when it refused its input)."""
    threads = threads_per_job(parallel) if not devices else 1
    pending = list(enumerate(jobs))
    running, failures = [], []
    with tempfile.TemporaryDirectory(prefix="causalmer-jobs-") as folder:
        while pending or running:
            while pending and len(running) < parallel:
                index, (label, arguments) = pending.pop(0)
                device = ["--device", devices[index % len(devices)]] if devices else []
                output = open(Path(folder) / f"{index}.log", "w+", encoding="utf-8")
                process = subprocess.Popen([*program, *arguments, *device], stdout=output, stderr=subprocess.STDOUT,
                                           env=job_environment(threads), text=True)
                print(f"started {label}" + (f" on {device[1]}" if device else f" ({threads} CPU threads)"), flush=True)
                running.append((label, process, output, time.time()))
            time.sleep(0.2)
            for entry in list(running):
                label, process, output, started = entry
                if process.poll() is None:
                    continue
                running.remove(entry)
                output.seek(0)
                text = output.read()
                output.close()
                if process.returncode == 0:
                    print(f"finished {label} in {time.time() - started:.0f}s", flush=True)
                else:
                    failures.append((label, process.returncode, text))
    if failures:
        details = "; ".join(f"{label} exited with {code}: ...{text.strip()[-600:]}" for label, code, text in failures)
        raise UserError(f"{len(failures)} of {len(jobs)} runs failed (the others finished and are kept): {details}")


def spec_argv(spec, device: str, resume: bool = False) -> list[str]:
    """The `main.py train` arguments of a RunSpec (src/commands/train.py), as a process is started with."""
    argv = ["train", "--dataset", spec.dataset, "--name", spec.name, "--seed", str(spec.seed), "--model", spec.model,
            "--runs-dir", str(spec.runs_dir), "--device", device]
    for flag, value in (("--backbone", spec.backbone), ("--config", spec.config_file), ("--data-dir", spec.data_dir),
                        ("--data-file", spec.data_file), ("--data-format", spec.data_format), ("--task", spec.task), ("--epochs", spec.epochs), ("--logger", spec.logger),
                        ("--init-from", spec.init_from)):
        if value is not None:
            argv += [flag, str(value)]
    for flag, on in (("--unaligned", spec.unaligned), ("--clean-nonfinite", spec.clean_nonfinite),
                     ("--compile", spec.compile), ("--resume", resume)):
        if on:
            argv.append(flag)
    for override in spec.overrides:
        argv += ["--set", override]
    return argv


def main_program(main_file: str) -> list[str]:
    """The command that runs main.py with this interpreter."""
    return [sys.executable, str(Path(main_file).resolve())]
