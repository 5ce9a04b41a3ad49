"""Start a training run: the whole lifecycle of one run directory, callable from the command line or a notebook.

    from causalmer.commands.train import RunSpec, start_run
    results = start_run(RunSpec("iemocap", "nb", epochs=2, data_dir="data/synthetic"), device="cpu")

The order is what keeps a run directory sound: the input is checked (config, data, model) before the
directory is created, so a refused run leaves nothing behind; the directory is locked for the whole run;
config.yaml is written before the first epoch; train.log starts once the directory exists.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import remove_stale_temporaries, write_text
from ..errors import UserError
from ..eval import metrics
from ..eval.tables import print_run_results
from ..analysis.plots import PLOTS_HINT, plot_curves
from ..run import checkpoint as ckpt_io
from ..run import distributed
from ..run.config import dump_config, load_config, without_execution_keys
from ..run.published import init_record
from ..run.identity import check_resume_data
from ..run.rundir import exclusive, holds_run, refuse_if_in_use, run_path, set_aside
from ..run.runtime import setup_logging
from ..train.loop import PROGRESS_SECONDS, prepare, train
from .parallel import run_jobs, spec_argv

log = logging.getLogger("causalmer")


@dataclass
class RunSpec:
    """What a run is: its place (runs_dir/dataset/name/seed<seed>), its model and its config with the
    command line's changes. `model` is "causalmer" or a backbone trained alone (then `backbone` stays
    None); `config_file` defaults to configs/<dataset>.yaml; `overrides` are KEY=VALUE strings as --set
    takes them; `init_from` is a published checkpoint to start from; `data_file` names the data file itself
    (instead of data_dir's file for the dataset), read as `data_format` (default: from its keys)."""
    dataset: str
    name: str
    seed: int = 1
    model: str = "causalmer"
    backbone: str | None = None
    config_file: str | None = None
    overrides: list[str] = field(default_factory=list)
    runs_dir: str = "checkpoints"
    data_dir: str | None = None
    data_file: str | None = None
    data_format: str | None = None
    unaligned: bool = False
    task: str | None = None
    epochs: int | None = None
    clean_nonfinite: bool = False
    logger: str | None = None
    compile: bool = False
    init_from: str | None = None

    @property
    def run_dir(self) -> Path:
        return run_path(self.runs_dir, self.dataset, self.name, self.seed)

    def config(self, resume: bool = False) -> dict:
        """The resolved, validated config of this run (`resume`: of the run being continued)."""
        model_name, backbone = "causalmer", self.backbone
        if self.model != "causalmer":
            model_name, backbone = "backbone", self.model
            if self.backbone not in (None, self.model):
                raise UserError(f"--model {self.model} trains that backbone alone; --backbone {self.backbone} "
                                "only applies to --model causalmer")
        cli = {"data.dir": self.data_dir, "data.file": self.data_file, "data.format": self.data_format,
               "data.task": self.task, "train.epochs": self.epochs,
               "data.aligned": False if self.unaligned else None,
               "data.clean_nonfinite": True if self.clean_nonfinite else None,
               "train.logger": self.logger, "train.compile": True if self.compile else None}
        cfg = load_config(self.dataset, self.config_file, backbone=backbone, model_name=model_name,
                          overrides=self.overrides, cli=cli)
        # A resumed run keeps the published file it started from in its config, and does not need the file.
        config_file = self.run_dir / "config.yaml"
        recorded = (ckpt_io.read_config_file(config_file)["model"].get("init_from")
                    if resume and config_file.is_file() else None)
        if self.init_from or recorded:
            cfg["model"]["init_from"] = init_record(self.init_from, recorded)
        return cfg


def check_run_start(run_dir: Path, cfg: dict, resume: bool) -> None:
    """Refuse to start over a run, or to resume one that cannot be resumed or was started differently."""
    if resume:
        last = run_dir / ckpt_io.CHECKPOINT_NAMES["last"]
        if not last.is_file():
            raise UserError(f"--resume: no checkpoint to resume at {last}; start the run without --resume")
        saved = ckpt_io.read_config_file(run_dir / "config.yaml")
        ckpt_io.check_same_config(saved, cfg, run_dir / "config.yaml")
    elif holds_run(run_dir):
        raise UserError(f"run directory {run_dir} already holds a run; continue it with --resume, or choose "
                        "another --name or --seed (nothing was overwritten)")


def start_run(spec: RunSpec, device: str = "auto", amp: bool = False, resume: bool = False,
              progress_seconds: float = PROGRESS_SECONDS) -> dict:
    """Train the run `spec` describes (or continue it, `resume`) and return its metrics (metrics.json)."""
    cfg = spec.config(resume)
    run_dir = spec.run_dir
    refuse_if_in_use(run_dir)
    check_run_start(run_dir, cfg, resume)
    ctx = distributed.setup(device)
    distributed.warn_if_amp_ignored(ctx.device, amp)
    try:
        # The data, the backbone's options and the model itself are checked before the run directory is
        # created: a run refused for its input leaves nothing behind.
        prepared = prepare(cfg, ctx, spec.seed, resume=resume, run_dir=run_dir)
        if resume:
            check_resume_data(run_dir, prepared["splits"]["train"].source)
        with exclusive(run_dir) if ctx.is_main else contextlib.nullcontext():
            # Checked again under the lock: another process may have started this run meanwhile.
            check_run_start(run_dir, cfg, resume)
            # Every rank has looked at the run directory before rank 0 writes into it.
            distributed.barrier(ctx)
            if ctx.is_main:
                remove_stale_temporaries(run_dir)  # of a killed earlier attempt of this run
                write_text(run_dir / "config.yaml", dump_config(cfg))
            distributed.barrier(ctx)
            setup_logging(run_dir / "train.log", ctx.is_main)
            log.info("run %s | %s on %s | device %s%s", run_dir, cfg["model"]["name"], cfg["model"]["backbone"],
                     ctx.device, f" x{ctx.world_size}" if ctx.distributed else "")
            results = train(cfg, run_dir, ctx, seed=spec.seed, resume=resume, amp=amp, prepared=prepared,
                            progress_seconds=progress_seconds)
            if ctx.is_main:
                headline_key, _ = metrics.headline(prepared["splits"]["train"].task)
                write_curves(results["history"], run_dir / "curves.png", headline_key)
        if ctx.is_main:
            print_run_results(results, cfg)
        return results
    finally:
        # What is logged after the run (the next run of compare, a notebook's next cell) is not this run's.
        setup_logging(main_process=ctx.is_main)
        distributed.teardown(ctx)


def write_curves(history: list, path: Path, headline_key: str) -> None:
    """curves.png of a run's history (skipped, saying why, without matplotlib)."""
    if plot_curves(history, path, headline_key) is None:
        log.info("curves.png skipped: %s", PLOTS_HINT)
    else:
        log.info("wrote %s", path)


# -------------------------------------------------------------- several runs (compare, demo)
def plan_run(spec: RunSpec, fresh: bool, flag: str) -> str:
    """What to do with one run of compare/demo: 'train', 'resume', 'reuse' (finished, same config) or
    'replace' (another config, and `fresh` lets it be moved aside).

    An existing run is reused or continued only if it was started with exactly the config asked for now;
    a run of another config is refused, naming the first difference, unless `fresh` is set."""
    run_dir = spec.run_dir
    if not holds_run(run_dir):
        return "train"
    refuse_if_in_use(run_dir)  # a run still training is neither reused, continued nor moved
    saved = ckpt_io.read_config_file(run_dir / "config.yaml")
    asked = spec.config(resume=True)
    difference = ckpt_io.first_difference(without_execution_keys(saved), without_execution_keys(asked))
    if difference is None:
        return "reuse" if (run_dir / "metrics.json").is_file() else "resume"
    if not fresh:
        key, got, want = difference
        raise UserError(f"{run_dir} holds a run started with {key} = {got!r}, but this command asks for "
                        f"{want!r}; nothing was trained. Add {flag} to move the runs of another config aside "
                        f"(to {run_dir.parent / 'replaced'}/) and train them again, or use another --name")
    return "replace"


def train_all(specs: list[RunSpec], fresh: bool, flag: str, device: str = "auto", jobs: int = 1,
              devices: list[str] | None = None, program: list[str] | None = None) -> None:
    """Train (or continue, or reuse) every run; every existing run is checked before anything is trained.
    `flag` is how the caller spells `fresh`, for the message that refuses a run of another config.

    With `jobs` > 1 the runs to train go to that many `program` processes (main.py) at once, dealt over
    `devices` when given (src/commands/parallel.py)."""
    plans = [plan_run(spec, fresh, flag) for spec in specs]
    queued = []
    for spec, plan in zip(specs, plans):
        print(f"\n=== {spec.name}, seed {spec.seed} ===")
        if plan == "reuse":
            print(f"{spec.run_dir} is already trained with this config; its results are reused")
            continue
        if plan == "replace":
            print(f"{spec.run_dir} was trained with another config; moved it to {set_aside(spec.run_dir)}")
        if jobs > 1:
            queued.append((f"{spec.name}, seed {spec.seed}", spec_argv(spec, device, resume=plan == "resume")))
        else:
            start_run(spec, device=device, resume=plan == "resume")
    if queued:
        run_jobs(program, queued, jobs, devices or [])
