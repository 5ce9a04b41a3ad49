"""CausalMER command line: make-data | train | eval | analyze | compare | summarize | demo | import-checkpoint.

    python main.py demo                                   # synthetic data, train, evaluate (CPU, minutes)
    python main.py make-data --dataset iemocap            # a synthetic file in the MulT layout
    python main.py train --dataset iemocap --name run --seed 1 [--model mult] [--set train.epochs=5]
    python main.py eval  --dataset iemocap --name run --seed 1 [--remove sweep]
    python main.py analyze checkpoints/iemocap/run/seed1 [checkpoints/iemocap/base/seed1]
    python main.py compare --dataset iemocap --seeds 1 2 3        # backbone alone vs CausalMER, mean ± std
    python main.py summarize --group causalmer=checkpoints/iemocap/run --group mult=checkpoints/iemocap/base
    python main.py import-checkpoint checkpoint_iemocap_MULT.pt --dataset iemocap --name published

Mistakes in input (files, configs, flags, checkpoints) end with a one-paragraph message and exit code 2;
anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from src.commands.analyze import analyze_runs
from src.commands.compare import compare
from src.commands.parallel import main_program, parse_devices
from src.commands.demo import demo
from src.commands.evaluate import check_run_flags, evaluate_run
from src.commands.importing import import_checkpoint
from src.commands.make_data import make_data
from src.commands.robustness import robustness_run
from src.commands.summarize import summarize_flags
from src.analysis.table import FORMATS as TABLE_FORMATS
from src.commands.train import RunSpec, start_run
from src.data.layout import DATASETS, FORMATS
from src.errors import UserError
from src.eval.stats import DEFAULT_ROUNDS
from src.eval.robustness import DRAWS, RATES
from src.modalities import MODALITIES
from src.models import BACKBONES
from src.run.config import LOGGERS, parse_override
from src.run.rundir import run_path
from src.run.runtime import keep_freed_memory, setup_logging

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


def add_table_arguments(p: argparse.ArgumentParser) -> None:
    """The paper table's options, shared by compare and summarize."""
    p.add_argument("--format", default="markdown", choices=TABLE_FORMATS,
                   help="the paper table's format, printed and written beside the summary CSV (default markdown)")
    p.add_argument("--full", action="store_true", help="also print every metric of every group (mean ± std)")


def add_data_file_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-file", default=None, metavar="PATH",
                   help="the data pickle itself (MulT or MMSA layout), instead of --data-dir's file-name rule")
    p.add_argument("--data-format", default=None, choices=FORMATS,
                   help="insist on this layout (default: read it from the file's keys)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="main.py", description="CausalMER: counterfactual debiasing of "
                                     "multimodal emotion recognition", formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("make-data", help="write a synthetic dataset in the exact MulT pickle layout")
    data.add_argument("--dataset", required=True, choices=DATASET_CHOICES)
    data.add_argument("--data-dir", default="data")
    data.add_argument("--data-file", default=None, metavar="PATH", help="write exactly this file instead")
    data.add_argument("--format", default=None, choices=FORMATS,
                      help="mult (MulT's layout) or mmsa (MMSA's: BERT-sized text, lengths); default: the dataset's first")
    data.add_argument("--extra-split", action="append", default=[], metavar="NAME",
                      help="one more split drawn as test is, e.g. test_ood (repeatable)")
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
        add_data_file_arguments(p)
        p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1")
        p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
        p.add_argument("--compile", action="store_true",
                       help="torch.compile the model for training and evaluation (config train.compile)")
        # What a run is and how it trains: train's flags, and eval's too, since inference.sh passes main.sh's
        # arguments through; eval checks those that say what the run is against its config (check_run_flags)
        # and has no use for the rest (--resume, --logger, --progress-every).
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
        p.add_argument("--progress-every", type=float, default=60.0, metavar="SECONDS",
                       help="without a terminal (nohup, a scheduler): a progress line this often (default 60; "
                       "0: none)")
        p.add_argument("--logger", default=None, choices=LOGGERS,
                       help="per-epoch scalars to TensorBoard in <run>/tensorboard, or to Weights & Biases "
                       "in <run>/wandb (offline unless WANDB_MODE=online) (default: train.logger)")
        if name == "eval":
            p.add_argument("--checkpoint", default="best_acc",
                           help="best_acc (default), best_loss, last, or a path to a .pt file")
            p.add_argument("--split", default="test", help="test (default), valid, train, or any split the file holds "
                           "(e.g. test_ood)")
            p.add_argument("--remove", default=None,
                           help="zero these modalities at evaluation: letters of t, a, v (e.g. a, tv), or sweep")
            p.add_argument("--analyze", action="store_true", help="also run the modality analysis")
            p.add_argument("--save-predictions", action="store_true",
                           help="also write every per-sample output to <run>/predictions_<split>.npz")

    analyze = sub.add_parser("analyze", help="modality contributions, NDE shares, balance and robustness of runs")
    analyze.add_argument("runs", nargs="+", help="run directories (e.g. CausalMER and its baseline)")
    analyze.add_argument("--checkpoint", default="best_acc")
    analyze.add_argument("--split", default="test", help="test (default), valid, or any split the file holds")
    analyze.add_argument("--device", default="auto")
    analyze.add_argument("--data-dir", default=None)
    add_data_file_arguments(analyze)
    analyze.add_argument("--out", default=None, help="where to write the JSON and PNGs (default: the first run)")
    analyze.add_argument("--attention", action="store_true",
                         help="also write each run's crossmodal attention maps (mult, dmd): attention_*.npz/png")
    analyze.add_argument("--sample", type=int, default=None,
                         help="with --attention: the map of this sample of the split instead of the mean")
    analyze.add_argument("--label", action="append", default=None,
                         help="the name of a run in the charts, once per run in order (default: the run's name); "
                         "runs with one label are averaged, with the std over them as error bars")
    analyze.add_argument("--figure-format", default="png", choices=("png", "pdf", "svg"),
                         help="the charts' file format (default png)")

    compare = sub.add_parser("compare", help="train the backbone alone and CausalMER over several seeds, then "
                             "summarise both as mean ± std")
    compare.add_argument("--dataset", required=True, choices=DATASET_CHOICES)
    compare.add_argument("--seeds", type=seed_value, nargs="+", default=[1, 2, 3])
    compare.add_argument("--backbone", default="mult", choices=BACKBONE_CHOICES)
    compare.add_argument("--name", default="compare", help="runs are <name>_<backbone> and <name>_causalmer_<backbone>")
    compare.add_argument("--runs-dir", default="checkpoints")
    compare.add_argument("--data-dir", default=None)
    add_data_file_arguments(compare)
    compare.add_argument("--device", default="auto")
    compare.add_argument("--config", default=None)
    compare.add_argument("--unaligned", action="store_true")
    compare.add_argument("--task", default=None)
    compare.add_argument("--epochs", type=int, default=None)
    compare.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    compare.add_argument("--fresh", action="store_true",
                         help="move existing runs of another config aside (to <name>/replaced/) and train them again")
    compare.add_argument("--jobs", type=int, default=1,
                         help="train this many runs at once, each in its own process (default 1: one after another)")
    compare.add_argument("--devices", default=None, metavar="LIST",
                         help="with --jobs: spread the runs over these devices in turn, e.g. cuda:0,cuda:1 "
                         "(default: --device for all; on the CPU each process gets its share of the cores)")
    add_table_arguments(compare)

    summarize = sub.add_parser("summarize", help="mean ± std over seeds of every metric, groups side by side")
    summarize.add_argument("--group", action="append", required=True, metavar="LABEL=DIR",
                           help="LABEL=DIR where DIR holds seed*/metrics.json (repeatable)")
    summarize.add_argument("--out", default=None, help="CSV path (default: summary.csv in the first DIR)")
    add_table_arguments(summarize)

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
                              "code (torch.save of its MULTModel or CAUSALMER) or the official DMD's weights "
                              "(torch.save of its state_dict), read without running it")
    imported.add_argument("file", help="the published .pt file, or the official DMD's .pth")
    add_run_arguments(imported)
    imported.add_argument("--unaligned", action="store_true", help="the model is evaluated on unaligned data")
    robust = sub.add_parser("robustness", help="debiasing where the shortcut stops paying: bias-conflicting "
                            "subsets, effect scaling chosen on valid, random missing modalities, intervals")
    add_run_arguments(robust)
    add_data_file_arguments(robust)
    robust.add_argument("--checkpoint", default="best_acc")
    robust.add_argument("--split", default="test", help="the split reported (α is chosen on valid)")
    robust.add_argument("--device", default="auto")
    robust.add_argument("--subsets", default=None, metavar="FILE.json", help="more subsets: {name: [rows or ids]}")
    robust.add_argument("--baseline", default=None, metavar="RUN_DIR", help="a backbone-alone run of the same data")
    robust.add_argument("--rates", type=float, nargs="+", default=list(RATES), help="missing rates (default 0, 0.1, ..., 0.7)")
    robust.add_argument("--draws", type=int, default=DRAWS, help=f"mask draws per rate (default {DRAWS})")
    robust.add_argument("--bootstrap", type=int, default=DEFAULT_ROUNDS, help=f"bootstrap rounds (default {DEFAULT_ROUNDS})")
    return parser


# ----------------------------------------------------------------------------------------------- dispatch
# Each command is a library function under src/commands/; here the flags become its arguments.
def run_spec(args) -> RunSpec:
    return RunSpec(dataset=args.dataset, name=args.name, seed=args.seed, model=args.model, backbone=args.backbone,
                   config_file=args.config, overrides=args.overrides, runs_dir=args.runs_dir, data_dir=args.data_dir,
                   data_file=args.data_file, data_format=args.data_format, unaligned=args.unaligned, task=args.task,
                   epochs=args.epochs, clean_nonfinite=args.clean_nonfinite, logger=args.logger, compile=args.compile,
                   init_from=args.init_from)


def run_flags(args) -> list:
    """(config key, value, flag) of each training flag given to eval, for check_run_flags."""
    if args.config is not None:
        raise UserError(f"--config {args.config}: eval reads the run's own config.yaml; --config is for train")
    expected = []
    if args.model != "causalmer":
        expected += [("model.name", "backbone", f"--model {args.model}"), ("model.backbone", args.model, f"--model {args.model}")]
    for key, value, flag in (("model.backbone", args.backbone, "--backbone"), ("data.task", args.task, "--task"),
                             ("train.epochs", args.epochs, "--epochs")):
        if value is not None:
            expected.append((key, value, f"{flag} {value}"))
    if args.unaligned:
        expected.append(("data.aligned", False, "--unaligned"))
    if args.clean_nonfinite:
        expected.append(("data.clean_nonfinite", True, "--clean-nonfinite"))
    for text in args.overrides:
        path, value = parse_override(text)
        expected.append((".".join(path), value, f"--set {text}"))
    return expected


COMMANDS = {
    "make-data": lambda a: make_data(a.dataset, data_dir=a.data_dir, unaligned=a.unaligned, scale=a.scale,
                                     seed=a.seed, bias_modality=a.bias_modality, bias_strength=a.bias_strength,
                                     force=a.force, data_format=a.format, extra_splits=a.extra_split,
                                     path=a.data_file),
    "train": lambda a: start_run(run_spec(a), device=a.device, amp=a.amp, resume=a.resume,
                                 progress_seconds=a.progress_every),
    "eval": lambda a: check_run_flags(run_path(a.runs_dir, a.dataset, a.name, a.seed), run_flags(a)) or evaluate_run(run_path(a.runs_dir, a.dataset, a.name, a.seed), checkpoint=a.checkpoint,
                                   split=a.split, remove=a.remove, device=a.device, amp=a.amp, data_dir=a.data_dir,
                                   analyze=a.analyze, compiled=a.compile, dataset=a.dataset,
                                   save_predictions=a.save_predictions, data_file=a.data_file,
                                   data_format=a.data_format),
    "analyze": lambda a: analyze_runs([Path(r) for r in a.runs], checkpoint=a.checkpoint, split=a.split,
                                      device=a.device, data_dir=a.data_dir, out_dir=a.out, attention=a.attention,
                                      sample=a.sample, labels=a.label, figure_format=a.figure_format,
                                      data_file=a.data_file, data_format=a.data_format),
    "compare": lambda a: compare(a.dataset, seeds=a.seeds, backbone=a.backbone, name=a.name, runs_dir=a.runs_dir,
                                 data_dir=a.data_dir, data_file=a.data_file, data_format=a.data_format,
                                 device=a.device, config_file=a.config, unaligned=a.unaligned,
                                 task=a.task, epochs=a.epochs, overrides=a.overrides, fresh=a.fresh,
                                 table_format=a.format, full=a.full, jobs=a.jobs,
                                 devices=parse_devices(a.devices), program=main_program(__file__)),
    "summarize": lambda a: summarize_flags(a.group, a.out, table_format=a.format, full=a.full),
    "demo": lambda a: demo(data_dir=a.data_dir, runs_dir=a.runs_dir, epochs=a.epochs, device=a.device,
                           fresh=a.fresh),
    "import-checkpoint": lambda a: import_checkpoint(a.file, a.dataset, a.name, seed=a.seed, runs_dir=a.runs_dir,
                                                     data_dir=a.data_dir, unaligned=a.unaligned),
    "robustness": lambda a: robustness_run(run_path(a.runs_dir, a.dataset, a.name, a.seed), checkpoint=a.checkpoint,
                                           split=a.split, device=a.device, data_dir=a.data_dir, subsets_file=a.subsets,
                                           baseline=a.baseline, rates=a.rates, draws=a.draws, rounds=a.bootstrap,
                                           dataset=a.dataset, data_file=a.data_file, data_format=a.data_format),
}


def main(argv=None) -> int:
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
