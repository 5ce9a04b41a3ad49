"""What the `robustness` command costs: its wall time against one plain `eval`, and its forward passes.

On a MOSEI-sized aligned test split (4659 samples; valid 1871 as in CMU-MOSEI; a small training split,
since only the probes and one epoch of training read it) of synthetic data, one CausalMER run (a small
MulT so that the CPU run takes minutes) with a MulT-alone baseline is trained for one epoch; then, in
this process, one `eval` of the test split and one `robustness` (default rates, draws, α grid and
bootstrap, with `--baseline`) are timed. Forward passes are counted by instrumentation: a forward hook
on every model counts batches, and the command's prediction function counts passes over a split. The
expected count, one pass per split (test, valid) plus one per missing rate above 0 and draw, for each
model, is printed beside the measured one.

    python benchmarks/robustness.py                   # the command's defaults, with --baseline
    python benchmarks/robustness.py --draws 1 --no-baseline   # fewer passes on a busy machine
    python benchmarks/robustness.py --quick           # small splits, a smoke run

Results: benchmarks/results/robustness.json and robustness.md (robustness_quick.* with --quick).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run as a script from anywhere: `src` is the project package
RESULTS = REPO / "benchmarks" / "results"

import torch  # noqa: E402

import main  # noqa: E402
from src.commands import robustness as command  # noqa: E402
from src.commands.evaluate import evaluate_run  # noqa: E402
from src.data.layout import SPLITS, data_file, get_spec  # noqa: E402
from src.data.synthetic import _split  # noqa: E402  (one split of a chosen size; write_synthetic scales all)
from src.eval.stats import DEFAULT_ROUNDS  # noqa: E402
from src.eval.robustness import ALPHA_GRID, DRAWS, RATES  # noqa: E402

SIZES = {"full": {"train": 400, "valid": 1871, "test": 4659}, "quick": {"train": 60, "valid": 40, "test": 80}}
MODEL = ["--set", "model.backbone_params.d_model=10", "--set", "model.backbone_params.layers=1",
         "--set", "model.branches.text={kind: pool}", "--set", "model.branches.audio={kind: pool}",
         "--set", "model.branches.vision={kind: pool}", "--set", "train.batch_size=32",
         "--set", "train.eval_batch_size=256"]


def write_data(data_dir: Path, sizes: dict) -> Path:
    """A MOSEI aligned pickle with the given split sizes (audio shortcut in train/valid, as in debias.py)."""
    spec = get_spec("mosei_senti")
    data = {split: _split(spec, split, sizes[split], True, 0, "audio", 0.9, 1.0) for split in SPLITS}
    path = data_file(data_dir, "mosei_senti", True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(data, handle, protocol=4)
    return path


class Counter:
    """Batches through every top-level model (a global forward hook) and passes over a split."""

    def __init__(self):
        self.batches, self.passes = 0, {}
        self._models = set()

    def hook(self, module, inputs):
        if id(module) in self._models:
            self.batches += 1

    def watch_predictions(self):
        original = command.predict_all

        def counted(model, dataset, *args, **kwargs):
            self._models.add(id(model))
            key = f"{dataset.split}{'' if kwargs.get('keep') is None else ' (masked)'}"
            self.passes[key] = self.passes.get(key, 0) + 1
            return original(model, dataset, *args, **kwargs)

        command.predict_all = counted
        return original


def main_benchmark(args) -> dict:
    size = "quick" if args.quick else "full"
    sizes = SIZES[size]
    work = Path(tempfile.mkdtemp(prefix="causalmer_robustness_"))
    data_dir, runs = work / "data", work / "runs"
    write_data(data_dir, sizes)
    common = ["--dataset", "mosei_senti", "--data-dir", str(data_dir), "--runs-dir", str(runs), "--device", "cpu",
              "--epochs", "1", *MODEL]
    for name, model in (("causal", "causalmer"), ("alone", "mult"))[:1 if args.no_baseline else 2]:
        assert main.main(["train", *common, "--name", name, "--model", model]) == 0
    run_dir, baseline = runs / "mosei_senti" / "causal" / "seed1", runs / "mosei_senti" / "alone" / "seed1"

    started = time.perf_counter()
    evaluate_run(run_dir, split="test", device="cpu")
    eval_seconds = time.perf_counter() - started

    counter = Counter()
    handle = torch.nn.modules.module.register_module_forward_pre_hook(counter.hook)
    original = counter.watch_predictions()
    try:
        started = time.perf_counter()
        command.robustness_run(run_dir, device="cpu", baseline=None if args.no_baseline else str(baseline),
                               draws=args.draws)
        robustness_seconds = time.perf_counter() - started
    finally:
        handle.remove()
        command.predict_all = original
    models = 1 if args.no_baseline else 2  # the run, and the baseline on the test split
    expected = {"test": models, "valid": 1, "test (masked)": models * sum(1 for r in RATES if r > 0) * args.draws}
    return {"command": "python benchmarks/robustness.py " + " ".join(sys.argv[1:]), "size": size, "split_sizes": sizes, "model": "CausalMER on MulT d_model 10, 1 layer, pool branches"
            + ("" if args.no_baseline else "; baseline MulT alone of the same size"), "eval_batch_size": 256,
            "options": {"rates": list(RATES), "draws": args.draws, "alpha_grid": list(ALPHA_GRID),
                        "bootstrap": DEFAULT_ROUNDS, "baseline": not args.no_baseline},
            "eval_seconds": round(eval_seconds, 2), "robustness_seconds": round(robustness_seconds, 2),
            "ratio": round(robustness_seconds / eval_seconds, 1),
            "split_passes": counter.passes, "expected_split_passes": expected, "batches": counter.batches,
            "machine": {"python": platform.python_version(), "torch": torch.__version__,
                        "platform": platform.platform(), "threads": torch.get_num_threads(),
                        "load_average": os.getloadavg()}}


def markdown(result: dict) -> str:
    passes = result["split_passes"]
    return "\n".join([
        "# Cost of `robustness`", "",
        f"MOSEI-sized aligned synthetic data (test {result['split_sizes']['test']}, valid "
        f"{result['split_sizes']['valid']}), {result['model']}, CPU, {result['machine']['threads']} threads, "
        f"load average {result['machine']['load_average'][0]:.1f} at the end.", "",
        "| measure | value |", "|---|---|",
        f"| one plain `eval` of the test split | {result['eval_seconds']:.1f} s |",
        f"| `robustness`{' --baseline' if result['options']['baseline'] else ''} ({len(result['options']['rates'])} "
        f"rates × {result['options']['draws']} draws, α grid of {len(result['options']['alpha_grid'])}, "
        f"{result['options']['bootstrap']} bootstrap rounds) "
        f"| {result['robustness_seconds']:.1f} s ({result['ratio']}× eval) |",
        "| passes over a split, measured | " + ", ".join(f"{k} {v}" for k, v in passes.items()) + " |",
        "| passes over a split, expected | " + ", ".join(f"{k} {v}" for k, v in result["expected_split_passes"].items())
        + " |",
        f"| model forward calls (batches) | {result['batches']} |", ""])


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--draws", type=int, default=DRAWS, help=f"mask draws per missing rate (default {DRAWS})")
    parser.add_argument("--no-baseline", action="store_true", help="without a backbone-alone baseline run")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    result = main_benchmark(args)
    stem = "robustness_quick" if args.quick else "robustness"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main_cli()
