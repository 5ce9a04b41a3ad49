"""The backbone alone and CausalMER on it, trained over the same seeds, then summarised side by side."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..run.rundir import check_run_name
from .summarize import summarize_groups
from .train import RunSpec, train_all


def compare(dataset: str, seeds=(1, 2, 3), backbone: str = "mult", name: str = "compare",
            runs_dir: str = "checkpoints", data_dir: str | None = None, data_file: str | None = None,
            data_format: str | None = None, device: str = "auto",
            config_file: str | None = None, unaligned: bool = False, task: str | None = None,
            epochs: int | None = None, overrides=(), fresh: bool = False, table_format: str = "markdown",
            full: bool = False, jobs: int = 1, devices: list[str] | None = None,
            program: list[str] | None = None) -> Path:
    """Train (or reuse) <name>_<backbone> and <name>_causalmer_<backbone> for every seed, then write
    <runs_dir>/<dataset>/<name>_<backbone>_summary.csv of exactly these runs; returns its path.

    `fresh` moves runs of another config aside instead of refusing them."""
    check_run_name(name)
    common = dict(dataset=dataset, runs_dir=runs_dir, data_dir=data_dir, data_file=data_file,
                  data_format=data_format, config_file=config_file,
                  unaligned=unaligned, task=task, epochs=epochs, overrides=list(overrides))
    models = {f"{name}_{backbone}": dict(model=backbone),
              f"{name}_causalmer_{backbone}": dict(model="causalmer", backbone=backbone)}
    specs = [RunSpec(name=run_name, seed=seed, **common, **model)
             for seed in seeds for run_name, model in models.items()]
    if jobs < 1:
        raise UserError(f"--jobs {jobs}: the number of runs at once is at least 1")
    train_all(specs, fresh, "--fresh", device, jobs=jobs, devices=devices, program=program)
    # Exactly the runs of this command: other seeds in the same directories may be of another config.
    groups = {run_name: [s.run_dir for s in specs if s.name == run_name] for run_name in models}
    out = Path(runs_dir) / dataset / f"{name}_{backbone}_summary.csv"
    summarize_groups(groups, out, table_format, full)
    return out
