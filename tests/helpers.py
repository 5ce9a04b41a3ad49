"""Helpers several test files share: the command line as a shell sees it, run directories, the benchmarks."""
import importlib
import sys
from pathlib import Path

import main

REPO = Path(__file__).resolve().parents[1]


def run(capsys, *args):
    """main.main(args) -> (exit code, stdout, stderr); argparse's own exits count as exit codes too."""
    try:
        code = main.main([str(a) for a in args])
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def copy_run(run_dir: Path, runs: Path, name: str = "tiny", seed: int = 3, dataset: str = "iemocap") -> Path:
    """A copy of a trained run's files as run `name`/seed `seed` under `runs`, for a test to damage."""
    copy = runs / dataset / name / f"seed{seed}"
    copy.mkdir(parents=True)
    for item in Path(run_dir).iterdir():
        if item.is_file():
            (copy / item.name).write_bytes(item.read_bytes())
    return copy


def benchmark_module(name: str):
    """A script of benchmarks/ imported as a module (the scripts are not a package)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
