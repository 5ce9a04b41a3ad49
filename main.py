"""CausalMER command line: make-data | train | eval | analyze | compare | summarize | demo.

    python main.py demo                                   # synthetic data, train, evaluate (CPU, minutes)
    python main.py make-data --dataset iemocap            # a synthetic file in the MulT layout
    python main.py train --dataset iemocap --name run --seed 1 [--model mult] [--set train.epochs=5]
    python main.py eval  --dataset iemocap --name run --seed 1 [--remove sweep]
    python main.py analyze checkpoints/iemocap/run/seed1 [checkpoints/iemocap/base/seed1]
    python main.py compare --dataset iemocap --seeds 1 2 3        # backbone alone vs CausalMER, mean ± std
    python main.py summarize --group causalmer=checkpoints/iemocap/run --group mult=checkpoints/iemocap/base

Mistakes in input (files, configs, flags, checkpoints) end with a one-paragraph message and exit code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from src.errors import UserError

log = logging.getLogger("causalmer")
DATASET_CHOICES = ("iemocap", "mosei_senti", "mosi")
MODEL_CHOICES = ("causalmer", "mult", "dmd", "pmr")


# ----------------------------------------------------------------------------------------------- parsing
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description="CausalMER: counterfactual debiasing of "
                                     "multimodal emotion recognition", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("make-data", help="write a synthetic dataset in the exact MulT pickle layout")
    data.add_argument("--dataset", required=True, choices=DATASET_CHOICES)
    data.add_argument("--data-dir", default="data")
    data.add_argument("--unaligned", action="store_true", help="the unaligned layout (long audio/vision)")
    data.add_argument("--scale", type=float, default=0.1, help="fraction of the real number of samples")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--bias-modality", choices=("text", "audio", "vision"), default=None,
                      help="plant a label shortcut in this modality (train/valid only)")
    data.add_argument("--bias-strength", type=float, default=0.0, help="0..1: how often the shortcut is right")
    data.add_argument("--force", action="store_true", help="overwrite an existing file")

    for name, helptext in (("train", "train a run (CausalMER or a backbone alone)"),
                           ("eval", "evaluate a trained run's checkpoint")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("--dataset", required=True, choices=DATASET_CHOICES)
        p.add_argument("--name", required=True, help="run name: checkpoints/<dataset>/<name>/seed<seed>/")
        p.add_argument("--seed", type=int, default=1)
        p.add_argument("--runs-dir", default="checkpoints")
        p.add_argument("--data-dir", default=None, help="where the pickles are (default: the config's data.dir)")
        p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1")
        p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the model for training and evaluation (config train.compile)")
        if name == "train":
            p.add_argument("--model", default="causalmer", choices=MODEL_CHOICES,
                           help="causalmer (default), or a backbone trained alone: mult, dmd, pmr")
            p.add_argument("--backbone", default=None, choices=("mult", "dmd", "pmr"),
                           help="the backbone CausalMER wraps (default: the config's, mult)")
            p.add_argument("--config", default=None, help="a config file (default configs/<dataset>.yaml)")
            p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                           help="override a config value, e.g. --set train.epochs=5 (repeatable)")
            p.add_argument("--unaligned", action="store_true")
            p.add_argument("--task", default=None, help="mosei_senti/mosi: cls (default) or regression")
            p.add_argument("--epochs", type=int, default=None)
            p.add_argument("--clean-nonfinite", action="store_true", help="replace NaN/inf in the data by 0")
            p.add_argument("--resume", action="store_true", help="continue an interrupted run from last.pt")
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

    compare = sub.add_parser("compare", help="train the backbone alone and CausalMER over several seeds, then "
                             "summarise both as mean ± std")
    compare.add_argument("--dataset", required=True, choices=DATASET_CHOICES)
    compare.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    compare.add_argument("--backbone", default="mult", choices=("mult", "dmd", "pmr"))
    compare.add_argument("--name", default="compare", help="runs are <name>_<backbone> and <name>_causalmer_<backbone>")
    compare.add_argument("--runs-dir", default="checkpoints")
    compare.add_argument("--data-dir", default=None)
    compare.add_argument("--device", default="auto")
    compare.add_argument("--config", default=None)
    compare.add_argument("--unaligned", action="store_true")
    compare.add_argument("--task", default=None)
    compare.add_argument("--epochs", type=int, default=None)
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    summarize = sub.add_parser("summarize", help="mean ± std over seeds of every metric, groups side by side")
    summarize.add_argument("--group", action="append", required=True, metavar="LABEL=DIR",
                           help="LABEL=DIR where DIR holds seed*/metrics.json (repeatable)")
    summarize.add_argument("--out", default=None, help="CSV path (default: summary.csv in the first DIR)")

    demo = sub.add_parser("demo", help="synthetic IEMOCAP, train MulT and CausalMER briefly, evaluate both")
    demo.add_argument("--data-dir", default="data/synthetic")
    demo.add_argument("--runs-dir", default="checkpoints")
    demo.add_argument("--epochs", type=int, default=8)
    demo.add_argument("--device", default="cpu")
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


def run_dir_of(args) -> Path:
    return Path(args.runs_dir) / args.dataset / args.name / f"seed{args.seed}"


def resolve_train_config(args) -> dict:
    from src.train.config import load_config

    model_name, backbone = "causalmer", args.backbone
    if args.model != "causalmer":
        model_name, backbone = "backbone", args.model
        if args.backbone not in (None, args.model):
            raise UserError(f"--model {args.model} trains that backbone alone; --backbone {args.backbone} "
                            "only applies to --model causalmer")
    cli = {"data.dir": args.data_dir, "data.task": args.task, "train.epochs": args.epochs,
           "data.aligned": False if args.unaligned else None,
           "data.clean_nonfinite": True if args.clean_nonfinite else None,
           "train.compile": True if args.compile else None}
    return load_config(args.dataset, args.config, backbone=backbone, model_name=model_name,
                       overrides=args.overrides, cli=cli)


# ----------------------------------------------------------------------------------------------- commands
def cmd_make_data(args) -> None:
    from src.data import data_file
    from src.data.synthetic import write_synthetic

    target = data_file(args.data_dir, args.dataset, not args.unaligned)
    if target.exists() and not args.force:
        raise UserError(f"{target} already exists; pass --force to overwrite it (it may be a real dataset)")
    path = write_synthetic(args.data_dir, args.dataset, aligned=not args.unaligned, scale=args.scale,
                           seed=args.seed, bias_modality=args.bias_modality, bias_strength=args.bias_strength)
    print(f"wrote synthetic {args.dataset} ({'unaligned' if args.unaligned else 'aligned'}) to {path}")


def cmd_train(args) -> dict:
    from src.train import checkpoint as ckpt_io
    from src.train import distributed
    from src.train.config import dump_config
    from src.train.loop import train
    from src.train.report import print_run_results

    cfg = resolve_train_config(args)
    run_dir = run_dir_of(args)
    ctx = distributed.setup(args.device)
    try:
        last = run_dir / ckpt_io.CHECKPOINT_NAMES["last"]
        if args.resume:
            if not last.is_file():
                raise UserError(f"--resume: no checkpoint to resume at {last}; start the run without --resume")
            saved = ckpt_io.read_config_file(run_dir / "config.yaml")
            ckpt_io.check_same_config(saved, cfg, run_dir / "config.yaml")
        elif run_dir.exists() and any(run_dir.iterdir()):
            raise UserError(f"run directory {run_dir} already holds a run; continue it with --resume, or choose "
                            "another --name or --seed (nothing was overwritten)")
        # Every rank has looked at the run directory before rank 0 writes into it; otherwise a slower
        # rank could find rank 0's config.yaml and refuse the run as an existing one.
        distributed.barrier(ctx)
        if ctx.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            ckpt_io.atomic_write_text(dump_config(cfg), run_dir / "config.yaml")
        distributed.barrier(ctx)
        setup_logging(run_dir / "train.log", ctx.is_main)
        log.info("run %s | %s on %s | device %s%s", run_dir, cfg["model"]["name"], cfg["model"]["backbone"],
                 ctx.device, f" x{ctx.world_size}" if ctx.distributed else "")
        results = train(cfg, run_dir, ctx, seed=args.seed, resume=args.resume, amp=args.amp)
        if ctx.is_main:
            print_run_results(results, cfg)
        return results
    finally:
        distributed.teardown(ctx)


def cmd_eval(args) -> dict:
    from src.train.inference import evaluate_run

    return evaluate_run(run_dir_of(args), checkpoint=args.checkpoint, split=args.split, remove=args.remove,
                        device=args.device, amp=args.amp, data_dir=args.data_dir, analyze=args.analyze,
                        compiled=args.compile)


def cmd_analyze(args) -> dict:
    from src.train.inference import analyze_runs

    return analyze_runs([Path(r) for r in args.runs], checkpoint=args.checkpoint, split=args.split,
                        device=args.device, data_dir=args.data_dir, out_dir=args.out)


def cmd_summarize(args) -> None:
    from src.analysis.summary import collect_runs, format_summary, summarize, write_csv

    groups = {}
    for item in args.group:
        if "=" not in item:
            raise UserError(f"--group expects LABEL=DIR, got '{item}'")
        label, directory = item.split("=", 1)
        runs = collect_runs(Path(directory), "seed*")
        if not runs:
            raise UserError(f"--group {item}: no seed*/metrics.json under {directory}")
        groups[label] = runs
    rows = summarize(groups)
    out = Path(args.out) if args.out else Path(args.group[0].split("=", 1)[1]) / "summary.csv"
    write_csv(rows, out)
    print(format_summary(rows, list(groups)))
    print(f"\nwrote {out}")


def train_or_resume(run_args) -> None:
    """Train a run unless it is finished; continue it if it was interrupted."""
    run_dir = run_dir_of(run_args)
    if (run_dir / "metrics.json").is_file():
        print(f"{run_dir} is already trained (delete it to train again)")
        return
    run_args.resume = (run_dir / "last.pt").is_file()
    cmd_train(run_args)


def cmd_compare(args) -> None:
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
    for seed in args.seeds:
        for name, model in names.items():
            print(f"\n=== {name}, seed {seed} ===")
            train_or_resume(parser.parse_args(["train", *common, *model, "--name", name, "--seed", str(seed)]))
    groups = [f"{name}={Path(args.runs_dir) / args.dataset / name}" for name in names]
    out = Path(args.runs_dir) / args.dataset / f"{args.name}_{args.backbone}_summary.csv"
    cmd_summarize(parser.parse_args(["summarize", *sum((["--group", g] for g in groups), []), "--out", str(out)]))


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
    for model, name in (("mult", "demo_mult"), ("causalmer", "demo_causalmer")):
        print(f"\n=== training {name} ({model}) ===")
        train_or_resume(parser.parse_args(["train", *common, "--name", name, "--model", model,
                                           "--epochs", str(args.epochs)]))
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


COMMANDS = {"make-data": cmd_make_data, "train": cmd_train, "eval": cmd_eval, "analyze": cmd_analyze,
            "compare": cmd_compare, "summarize": cmd_summarize, "demo": cmd_demo}


def main(argv=None) -> int:
    from src.train.runtime import keep_freed_memory

    args = build_parser().parse_args(argv)
    setup_logging()
    keep_freed_memory()  # malloc reuses freed blocks: see src/train/runtime.py
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
