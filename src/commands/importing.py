"""A run directory made from a checkpoint of the published code, so eval, --remove and analyze work on it."""
from __future__ import annotations

import json
from pathlib import Path

from ..atomic import write_text
from ..errors import UserError
from ..run import checkpoint as ckpt_io
from ..run.config import dump_config
from ..run.identity import new_identity, write_identity
from ..run.published import build_imported, published_run_config
from ..run.rundir import IMPORTED_NAME, exclusive, holds_run, run_path


def import_checkpoint(file: str, dataset: str, name: str, seed: int = 1, runs_dir: str = "checkpoints",
                      data_dir: str | None = None, unaligned: bool = False) -> Path:
    """Write <runs_dir>/<dataset>/<name>/seed<seed>/: config.yaml, and best_acc.pt and best_loss.pt with the
    same weights (one file gives one model), and imported.json naming the file; returns the directory."""
    run_dir = run_path(runs_dir, dataset, name, seed)

    def refuse_existing():
        if holds_run(run_dir):
            raise UserError(f"run directory {run_dir} already holds a run; choose another --name or --seed "
                            "(nothing was overwritten)")

    refuse_existing()
    cfg, plan = published_run_config(file, dataset, aligned=not unaligned, data_dir=data_dir)
    model = build_imported(plan, cfg["loss"])
    config_text = dump_config(cfg)
    with exclusive(run_dir):
        refuse_existing()  # again under the lock: another process may have written the run meanwhile
        write_text(run_dir / "config.yaml", config_text)
        identity = new_identity(seed, None)  # an imported model was trained on no data of this tool
        write_identity(run_dir, identity)
        weights = ckpt_io.weights_record(model, config_text, epoch=0, run=identity)
        for which in ("best_acc", "best_loss"):
            ckpt_io.atomic_save(weights, run_dir / ckpt_io.CHECKPOINT_NAMES[which])
        # Written last: from here on the directory holds a run, which train and a second import refuse.
        write_text(run_dir / IMPORTED_NAME, json.dumps({**cfg["model"]["init_from"], "kind": plan["kind"]}, indent=2))
    what = "CausalMER" if plan["kind"] == "causalmer" else "MulT alone"
    print(f"imported {file} ({what}, {cfg['dataset']} {cfg['data']['task']}) into {run_dir}; evaluate it with "
          f"python main.py eval --dataset {dataset} --name {name} --seed {seed} --runs-dir {runs_dir}")
    return run_dir
