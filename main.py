"""CausalMER command line: make-data | train | eval | analyze | compare | summarize | demo | import-checkpoint.

    python main.py demo                                   # synthetic data, train, evaluate (CPU, minutes)
    python main.py make-data --dataset iemocap            # a synthetic file in the MulT layout
    python main.py train --dataset iemocap --name run --seed 1 [--model mult] [--set train.epochs=5]
    python main.py eval  --dataset iemocap --name run --seed 1 [--remove sweep]
    python main.py analyze checkpoints/iemocap/run/seed1 [checkpoints/iemocap/base/seed1]
    python main.py compare --dataset iemocap --seeds 1 2 3        # backbone alone vs CausalMER, mean ± std
    python main.py summarize --group causalmer=checkpoints/iemocap/run --group mult=checkpoints/iemocap/base
    python main.py import-checkpoint checkpoint_iemocap_MULT.pt --dataset iemocap --name published   # SPEC §10

Mistakes in input (files, configs, flags, checkpoints) end with a one-paragraph message and exit code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from src.data.layout import DATASETS
from src.errors import UserError
from src.modalities import MODALITIES
from src.models import BACKBONES

log = logging.getLogger("causalmer")
# Choices come from the registries: a new dataset or backbone needs no edit here.
DATASET_CHOICES = tuple(DATASETS)
BACKBONE_CHOICES = tuple(BACKBONES)
MODEL_CHOICES = ("causalmer", *BACKBONE_CHOICES)


# ----------------------------------------------------------------------------------------------- parsing
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit


def seed_value(text: str) -> int:
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
    if not 0 <= seed <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"{seed} is outside 0..{MAX_SEED} (2**32 - 1)")
    return seed


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments that name a run directory and its data, shared by train, eval and import-checkpoint."""
    p.add_argument("--dataset", required=True, choices=DATASET_CHOICES)
    p.add_argument("--name", required=True, help="run name: checkpoints/<dataset>/<name>/seed<seed>/")
    p.add_argument("--seed", type=seed_value, default=1)
    p.add_argument("--runs-dir", default="checkpoints")
    p.add_argument("--data-dir", default=None, help="where the pickles are (default: the config's data.dir)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description="CausalMER: counterfactual debiasing of "
                                     "multimodal emotion recognition", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("make-data", help="write a synthetic dataset in the exact MulT pickle layout")
    data.add_argument("--dataset", required=True, choices=DATASET_CHOICES)
    data.add_argument("--data-dir", default="data")
    data.add_argument("--unaligned", action="store_true", help="the unaligned layout (long audio/vision)")
    data.add_argument("--scale", type=float, default=0.1, help="fraction of the real number of samples")
    data.add_argument("--seed", type=seed_value, default=0)
    data.add_argument("--bias-modality", choices=MODALITIES, default=None,
                      help="plant a label shortcut in this modality (train/valid only)")
    data.add_argument("--bias-strength", type=float, default=0.0, help="0..1: how often the shortcut is right")
    data.add_argument("--force", action="store_true", help="overwrite an existing file")

    for name, helptext in (("train", "train a run (CausalMER or a backbone alone)"),
                           ("eval", "evaluate a trained run's checkpoint")):
        p = sub.add_parser(name, help=helptext)
        add_run_arguments(p)
        p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1")
        p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the model for training and evaluation (config train.compile)")
        if name == "train":
            p.add_argument("--model", default="causalmer", choices=MODEL_CHOICES,
                           help=f"causalmer (default), or a backbone trained alone: {', '.join(BACKBONE_CHOICES)}")
            p.add_argument("--backbone", default=None, choices=BACKBONE_CHOICES,
                           help="the backbone CausalMER wraps (default: the config's, mult)")
            p.add_argument("--config", default=None, help="a config file (default configs/<dataset>.yaml)")
            p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config value, e.g. --set train.epochs=5 (repeatable)")
            p.add_argument("--unaligned", action="store_true")
            p.add_argument("--task", default=None, help="mosei_senti/mosi: cls (default) or regression")
            p.add_argument("--epochs", type=int, default=None)
            p.add_argument("--clean-nonfinite", action="store_true", help="replace NaN/inf in the data by 0")
            p.add_argument("--resume", action="store_true", help="continue an interrupted run from last.pt")
            p.add_argument("--logger", default=None, choices=("none", "tensorboard"),
                           help="per-epoch scalars to TensorBoard in <run>/tensorboard (default: train.logger)")
        else:
            p.add_argument("--checkpoint", default="best_acc",
                           help="best_acc (default), best_loss, last, or a path to a .pt file")
            p.add_argument("--split", default="test", choices=("train", "valid", "test"))
            p.add_argument("--remove", default=None,
                           help="zero these modalities at evaluation: letters of t, a, v (e.g. a, tv), or sweep")
            p.add_argument("--analyze", action="store_true", help="also run the modality analysis")

    analyze = sub.add_parser("analyze", help="modality contributions, NDE shares, balance and robustness of runs")
    analyze.add_argument("runs", nargs="+", help="run directories (e.g. CausalMER and its baseline)")
    analyze.add_argument("--checkpoint", default="best_acc")
    analyze.add_argument("--split", default="test", choices=("valid", "test"))
    analyze.add_argument("--device", default="auto")
    analyze.add_argument("--data-dir", default=None)
    analyze.add_argument("--out", default=None, help="where to write the JSON and PNGs (default: the first run)")
    analyze.add_argument("--attention", action="store_true",
                         help="also write each run's crossmodal attention maps (mult, dmd): attention_*.npz/png")
    analyze.add_argument("--sample", type=int, default=None,
                         help="with --attention: the map of this sample of the split instead of the mean")

    compare = sub.add_parser("compare", help="train the backbone alone and CausalMER over several seeds, then "
                             "summarise both as mean ± std")
    compare.add_argument("--dataset", required=True, choices=DATASET_CHOICES)
    compare.add_argument("--seeds", type=seed_value, nargs="+", default=[1, 2, 3])
    compare.add_argument("--backbone", default="mult", choices=BACKBONE_CHOICES)
    compare.add_argument("--name", default="compare", help="runs are <name>_<backbone> and <name>_causalmer_<backbone>")
    compare.add_argument("--runs-dir", default="checkpoints")
    compare.add_argument("--data-dir", default=None)
    compare.add_argument("--device", default="auto")
    compare.add_argument("--config", default=None)
    compare.add_argument("--unaligned", action="store_true")
    compare.add_argument("--task", default=None)
    compare.add_argument("--epochs", type=int, default=None)
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    compare.add_argument("--fresh", action="store_true",
                         help="move existing runs of another config aside (to <name>/replaced/) and train them again")

    summarize = sub.add_parser("summarize", help="mean ± std over seeds of every metric, groups side by side")
    summarize.add_argument("--group", action="append", required=True, metavar="LABEL=DIR",
                           help="LABEL=DIR where DIR holds seed*/metrics.json (repeatable)")
    summarize.add_argument("--out", default=None, help="CSV path (default: summary.csv in the first DIR)")

    demo = sub.add_parser("demo", help="synthetic IEMOCAP, train MulT and CausalMER briefly, evaluate both")
    demo.add_argument("--data-dir", default="data/synthetic")
    demo.add_argument("--runs-dir", default="checkpoints")
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--fresh", action="store_true",
                      help="move existing demo runs of another config aside (to <name>/replaced/) and train them again")

    # Checkpoints of the published code (src/run/published.py): import one as a run, or start from one.
    sub.choices["train"].add_argument("--init-from", default=None, metavar="FILE",
                                      help="start from a published checkpoint's weights (its MulT sets the "
                                      "backbone; a CAUSALMER's branches and constants are used where the kinds match)")
    imported = sub.add_parser("import-checkpoint", help="make a run directory from a checkpoint of the published "
                              "code (torch.save of its MULTModel or CAUSALMER), read without running it")
    imported.add_argument("file", help="the published .pt file")
    add_run_arguments(imported)
    imported.add_argument("--unaligned", action="store_true", help="the model is evaluated on unaligned data")
    return parser


# ----------------------------------------------------------------------------------------------- helpers
def setup_logging(log_file: Path | None = None, main_process: bool = True) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO if main_process else logging.WARNING)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    root.addHandler(console)
    if log_file is not None and main_process:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


def check_run_name(name: str) -> str:
    """A run name is one folder name inside --runs-dir: no separators, no '..', not absolute."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or os.sep in name or Path(name).is_absolute():
        raise UserError(f"--name {name!r} must be a plain folder name (letters, digits, '_', '-', '.'), without "
                        "'/' or '..': runs live in <runs-dir>/<dataset>/<name>/seed<seed>/")
    return name


def run_dir_of(args) -> Path:
    return Path(args.runs_dir) / args.dataset / check_run_name(args.name) / f"seed{args.seed}"


def warn_if_amp_is_ignored(args) -> None:
    from src.run.distributed import resolve_device

    device = resolve_device(args.device) if args.amp else None
    if device is not None and device.type != "cuda":
        log.warning("--amp has no effect here: bf16 autocast runs on CUDA only; this run uses full float32 on %s",
                    device)


def resolve_train_config(args) -> dict:
    from src.run.config import load_config

    model_name, backbone = "causalmer", args.backbone
    if args.model != "causalmer":
        model_name, backbone = "backbone", args.model
        if args.backbone not in (None, args.model):
            raise UserError(f"--model {args.model} trains that backbone alone; --backbone {args.backbone} "
                            "only applies to --model causalmer")
    cli = {"data.dir": args.data_dir, "data.task": args.task, "train.epochs": args.epochs,
           "data.aligned": False if args.unaligned else None,
           "data.clean_nonfinite": True if args.clean_nonfinite else None,
           "train.logger": args.logger, "train.compile": True if args.compile else None}
    return load_config(args.dataset, args.config, backbone=backbone, model_name=model_name,
                       overrides=args.overrides, cli=cli)


# ----------------------------------------------------------------------------------------------- commands
def cmd_make_data(args) -> None:
    from src.data import data_file
    from src.data.synthetic import write_synthetic

    if args.bias_modality is not None and not args.bias_strength > 0:
        raise UserError(f"--bias-modality {args.bias_modality} plants a shortcut only with --bias-strength in "
                        f"(0, 1] (how often it agrees with the label); got {args.bias_strength}")
    target = data_file(args.data_dir, args.dataset, not args.unaligned)
    if target.exists() and not args.force:
        raise UserError(f"{target} already exists; pass --force to overwrite it (it may be a real dataset)")
    path = write_synthetic(args.data_dir, args.dataset, aligned=not args.unaligned, scale=args.scale,
                           seed=args.seed, bias_modality=args.bias_modality, bias_strength=args.bias_strength)
    print(f"wrote synthetic {args.dataset} ({'unaligned' if args.unaligned else 'aligned'}) to {path}")


def check_run_start(args, cfg: dict, run_dir: Path) -> None:
    """Refuse to start over a run, or to resume one that cannot be resumed or was started differently."""
    from src.run import checkpoint as ckpt_io
    from src.run.rundir import holds_run

    if args.resume:
        last = run_dir / ckpt_io.CHECKPOINT_NAMES["last"]
        if not last.is_file():
            raise UserError(f"--resume: no checkpoint to resume at {last}; start the run without --resume")
        saved = ckpt_io.read_config_file(run_dir / "config.yaml")
        ckpt_io.check_same_config(saved, cfg, run_dir / "config.yaml")
    elif holds_run(run_dir):
        raise UserError(f"run directory {run_dir} already holds a run; continue it with --resume, or choose "
                        "another --name or --seed (nothing was overwritten)")


def cmd_train(args) -> dict:
    import contextlib

    from src.atomic import remove_stale_temporaries, write_text
    from src.run import checkpoint as ckpt_io
    from src.run import distributed
    from src.run.config import dump_config
    from src.train.loop import prepare, train
    from src.eval.tables import print_run_results
    from src.run.rundir import exclusive, refuse_if_in_use

    cfg = resolve_train_config(args)
    if getattr(args, "init_from", None):
        from src.run.published import init_record

        cfg["model"]["init_from"] = init_record(args.init_from)
    run_dir = run_dir_of(args)
    refuse_if_in_use(run_dir)
    check_run_start(args, cfg, run_dir)
    ctx = distributed.setup(args.device)
    warn_if_amp_is_ignored(args)
    try:
        # The data, the backbone's options and the model itself are checked before the run directory is
        # created: a run refused for its input leaves nothing behind.
        prepared = prepare(cfg, ctx, args.seed, resume=args.resume)
        with exclusive(run_dir) if ctx.is_main else contextlib.nullcontext():
            # Checked again under the lock: another process may have started this run meanwhile.
            check_run_start(args, cfg, run_dir)
            # Every rank has looked at the run directory before rank 0 writes into it.
            distributed.barrier(ctx)
            if ctx.is_main:
                remove_stale_temporaries(run_dir)  # of a killed earlier attempt of this run
                write_text(run_dir / "config.yaml", dump_config(cfg))
            distributed.barrier(ctx)
            setup_logging(run_dir / "train.log", ctx.is_main)
            log.info("run %s | %s on %s | device %s%s", run_dir, cfg["model"]["name"], cfg["model"]["backbone"],
                     ctx.device, f" x{ctx.world_size}" if ctx.distributed else "")
            results = train(cfg, run_dir, ctx, seed=args.seed, resume=args.resume, amp=args.amp, prepared=prepared)
        if ctx.is_main:
            print_run_results(results, cfg)
        return results
    finally:
        distributed.teardown(ctx)


def cmd_eval(args) -> dict:
    from src.commands.evaluate import evaluate_run

    warn_if_amp_is_ignored(args)
    return evaluate_run(run_dir_of(args), checkpoint=args.checkpoint, split=args.split, remove=args.remove,
                        device=args.device, amp=args.amp, data_dir=args.data_dir, analyze=args.analyze,
                        compiled=args.compile)


def cmd_analyze(args) -> dict:
    from src.commands.evaluate import analyze_runs

    if args.sample is not None and not args.attention:
        raise UserError("--sample picks the sample of the attention maps; it needs --attention")
    return analyze_runs([Path(r) for r in args.runs], checkpoint=args.checkpoint, split=args.split,
                        device=args.device, data_dir=args.data_dir, out_dir=args.out, attention=args.attention,
                        sample=args.sample)


def cmd_summarize(args) -> None:
    from src.analysis.summary import collect_runs

    groups = {}
    for item in args.group:
        if "=" not in item:
            raise UserError(f"--group expects LABEL=DIR, got '{item}'")
        label, directory = item.split("=", 1)
        if label in groups:
            raise UserError(f"--group label '{label}' is given twice; each group needs its own label")
        runs = collect_runs(Path(directory), "seed*")
        if not runs:
            raise UserError(f"--group {item}: no seed*/metrics.json under {directory}")
        groups[label] = runs
    out = Path(args.out) if args.out else Path(args.group[0].split("=", 1)[1]) / "summary.csv"
    summarize_groups(groups, out)


def summarize_groups(groups: dict, out: Path) -> None:
    from src.analysis.summary import check_groups, format_summary, summarize, write_csv

    for warning in check_groups(groups):
        print(f"warning: {warning}", file=sys.stderr)
    rows = summarize(groups)
    write_csv(rows, out)
    print(format_summary(rows, list(groups)))
    print(f"\nwrote {out}")


def set_aside(run_dir: Path) -> Path:
    """Move a run out of the way, beside its siblings but out of reach of the seed* pattern."""
    import time

    target = run_dir.parent / "replaced" / f"{run_dir.name}-{time.strftime('%Y%m%dT%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    run_dir.rename(target)
    return target


def plan_run(run_args, fresh: bool, flag: str) -> str:
    """What to do with one run of compare/demo: 'train', 'resume' or 'reuse' (finished, same config).

    An existing run is reused or continued only if it was started with exactly the config asked for now;
    a run of another config is refused, naming the first difference, unless `fresh` lets it be moved aside."""
    from src.run import checkpoint as ckpt_io
    from src.run.config import without_execution_keys
    from src.run.rundir import holds_run

    run_dir = run_dir_of(run_args)
    if not holds_run(run_dir):
        return "train"
    saved = ckpt_io.read_config_file(run_dir / "config.yaml")
    difference = ckpt_io.first_difference(without_execution_keys(saved),
                                          without_execution_keys(resolve_train_config(run_args)))
    if difference is None:
        return "reuse" if (run_dir / "metrics.json").is_file() else "resume"
    if not fresh:
        key, got, want = difference
        raise UserError(f"{run_dir} holds a run started with {key} = {got!r}, but this command asks for "
                        f"{want!r}; nothing was trained. Add {flag} to move the runs of another config aside "
                        f"(to {run_dir.parent / 'replaced'}/) and train them again, or use another --name")
    return "replace"


def run_planned(run_args, plan: str) -> None:
    run_dir = run_dir_of(run_args)
    if plan == "reuse":
        print(f"{run_dir} is already trained with this config; its results are reused")
        return
    if plan == "replace":
        print(f"{run_dir} was trained with another config; moved it to {set_aside(run_dir)}")
    run_args.resume = plan == "resume"
    cmd_train(run_args)


def train_all(runs: list, fresh: bool, flag: str) -> None:
    """Train (or continue, or reuse) every run; every existing run is checked before anything is trained."""
    plans = [plan_run(run_args, fresh, flag) for run_args in runs]
    for run_args, plan in zip(runs, plans):
        print(f"\n=== {run_args.name}, seed {run_args.seed} ===")
        run_planned(run_args, plan)


def cmd_compare(args) -> None:
    check_run_name(args.name)
    parser = build_parser()
    common = ["--dataset", args.dataset, "--runs-dir", args.runs_dir, "--device", args.device]
    for flag, value in (("--data-dir", args.data_dir), ("--config", args.config), ("--task", args.task),
                        ("--epochs", args.epochs)):
        if value is not None:
            common += [flag, str(value)]
    if args.unaligned:
        common.append("--unaligned")
    for override in args.overrides:
        common += ["--set", override]
    names = {f"{args.name}_{args.backbone}": ["--model", args.backbone],
             f"{args.name}_causalmer_{args.backbone}": ["--model", "causalmer", "--backbone", args.backbone]}
    runs = [parser.parse_args(["train", *common, *model, "--name", name, "--seed", str(seed)])
            for seed in args.seeds for name, model in names.items()]
    train_all(runs, args.fresh, "--fresh")
    # Exactly the runs of this command: other seeds in the same directories may be of another config.
    groups = {name: [run_dir_of(r) for r in runs if r.name == name] for name in names}
    summarize_groups(groups, Path(args.runs_dir) / args.dataset / f"{args.name}_{args.backbone}_summary.csv")


def cmd_demo(args) -> None:
    from src.data import data_file
    from src.data.synthetic import DEFAULT_DEMO, write_synthetic

    path = data_file(args.data_dir, "iemocap", True)
    if not path.exists():
        write_synthetic(args.data_dir, **DEFAULT_DEMO)
        print(f"wrote synthetic IEMOCAP-layout data to {path}")
    parser = build_parser()
    common = ["--dataset", "iemocap", "--seed", "1", "--data-dir", args.data_dir, "--runs-dir", args.runs_dir,
              "--device", args.device]
    train_all([parser.parse_args(["train", *common, "--name", name, "--model", model, "--epochs", str(args.epochs)])
               for model, name in (("mult", "demo_mult"), ("causalmer", "demo_causalmer"))], args.fresh, "--fresh")
    eval_args = parser.parse_args(["eval", *common, "--name", "demo_causalmer", "--remove", "sweep"])
    print("\n=== missing-modality test of demo_causalmer ===")
    cmd_eval(eval_args)

    runs = [Path(args.runs_dir) / "iemocap" / name / "seed1" for name in ("demo_causalmer", "demo_mult")]
    print("\n=== modality contributions, CausalMER and the backbone alone ===")
    cmd_analyze(parser.parse_args(["analyze", *map(str, runs), "--data-dir", args.data_dir, "--device", args.device]))

    # The comparison the demo is for: the same backbone, data and seed, without and with the causal head.
    causal, alone = (json.loads((run / "metrics.json").read_text())["best_acc"]["test"]["predictions"] for run in runs)
    print("\n=== test avg_acc (%), checkpoints of the best validation avg_acc ===")
    print(f"MulT alone {100 * alone['m']['avg_acc']:.1f} | CausalMER: debiased (tie) {100 * causal['tie']['avg_acc']:.1f}, "
          f"fused (te) {100 * causal['te']['avg_acc']:.1f}, its backbone (m) {100 * causal['m']['avg_acc']:.1f}")


def cmd_import_checkpoint(args) -> Path:
    """A run directory holding a published checkpoint's model: config.yaml, and best_acc.pt and best_loss.pt
    with the same weights (one file gives one model), so eval, --remove and analyze work on it."""
    from src.run import checkpoint as ckpt_io
    from src.run.config import dump_config
    from src.run.published import build_imported, published_run_config
    from src.atomic import write_text
    from src.run.rundir import IMPORTED_NAME, exclusive, holds_run

    run_dir = run_dir_of(args)

    def refuse_existing():
        if holds_run(run_dir):
            raise UserError(f"run directory {run_dir} already holds a run; choose another --name or --seed "
                            "(nothing was overwritten)")

    refuse_existing()
    cfg, plan = published_run_config(args.file, args.dataset, aligned=not args.unaligned, data_dir=args.data_dir)
    model = build_imported(plan, cfg["loss"])
    config_text = dump_config(cfg)
    with exclusive(run_dir):
        refuse_existing()  # again under the lock: another process may have written the run meanwhile
        write_text(run_dir / "config.yaml", config_text)
        weights = {"model": model.state_dict(), "config": config_text, "epoch": 0}
        for which in ("best_acc", "best_loss"):
            ckpt_io.atomic_save(weights, run_dir / ckpt_io.CHECKPOINT_NAMES[which])
        # Written last: from here on the directory holds a run, which train and a second import refuse.
        write_text(run_dir / IMPORTED_NAME, json.dumps({**cfg["model"]["init_from"],
                                                        "kind": plan["kind"]}, indent=2))
    what = "CausalMER" if plan["kind"] == "causalmer" else "MulT alone"
    print(f"imported {args.file} ({what}, {cfg['dataset']} {cfg['data']['task']}) into {run_dir}; evaluate it with "
          f"python main.py eval --dataset {args.dataset} --name {args.name} --seed {args.seed} --runs-dir {args.runs_dir}")
    return run_dir


COMMANDS = {"make-data": cmd_make_data, "train": cmd_train, "eval": cmd_eval, "analyze": cmd_analyze,
            "compare": cmd_compare, "summarize": cmd_summarize, "demo": cmd_demo,
            "import-checkpoint": cmd_import_checkpoint}


def main(argv=None) -> int:
    from src.run.runtime import keep_freed_memory

    args = build_parser().parse_args(argv)
    setup_logging()
    keep_freed_memory()  # malloc reuses freed blocks: see src/run/runtime.py
    try:
        COMMANDS[args.command](args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a training run continues from its last epoch with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
