"""A run directory made from a foreign checkpoint (the published code's whole-model files, the official DMD's
weights), so eval, --remove and analyze work on it."""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..run.published import build_imported, published_run_config, save_imported_run
from ..run.rundir import exclusive, holds_run, run_path


def import_checkpoint(file: str, dataset: str, name: str, seed: int = 1, runs_dir: str = "checkpoints",
                      data_dir: str | None = None, unaligned: bool = False) -> Path:
    """Write <runs_dir>/<dataset>/<name>/seed<seed>/: config.yaml, and best_acc.pt and best_loss.pt with the
    same weights (one file gives one model), and imported.json naming the file, all or nothing; returns the
    directory."""
    run_dir = run_path(runs_dir, dataset, name, seed)

    def refuse_existing():
        if holds_run(run_dir):
            raise UserError(f"run directory {run_dir} already holds a run; choose another --name or --seed "
                            "(nothing was overwritten)")

    refuse_existing()
    cfg, plan = published_run_config(file, dataset, aligned=not unaligned, data_dir=data_dir)
    model = build_imported(plan, cfg["loss"])
    with exclusive(run_dir):
        refuse_existing()  # again under the lock: another process may have written the run meanwhile
        save_imported_run(run_dir, cfg, model, plan["kind"], seed)
    what = {"causalmer": "CausalMER", "mult": "MulT alone", "dmd": "DMD alone"}[plan["kind"]]
    print(f"imported {file} ({what}, {cfg['dataset']} {cfg['data']['task']}) into {run_dir}; evaluate it with "
          f"python main.py eval --dataset {dataset} --name {name} --seed {seed} --runs-dir {runs_dir}")
    return run_dir
