"""`robustness`: does debiasing help where the shortcut stops paying? One run, one command.

Scores a run's predictions (m, te, tie, tie_alpha; `baseline`: a backbone-alone run of the same data)
on the whole split and on its bias subsets (src/eval/subsets.py), sweeps the effect scaling TE − α·NDE
with α chosen on the validation split, sweeps random missing modalities, and puts paired bootstrap
intervals on the differences. Writes <run>/robustness/robustness.json, robustness.md, subsets_<split>.json
and the PNGs (an evaluation of another checkpoint or other data: robustness_<tag>/).
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from ..atomic import write_text
from ..errors import UserError
from ..eval import metrics
from ..eval.stats import DEFAULT_ROUNDS, DEFAULT_SEED, LEVEL, paired_interval
from ..eval.missing import check_rate
from ..eval.predictions import predict_all
from ..eval.robustness import (ALPHA_GRID, DRAWS, MISSING_SEED, RATES, alpha_curves, auilc, main_predictions,
                               mean_on, missing_masks, select_alpha, summarize_draws)
from ..eval.subsets import bias_subsets, probe_subsets, subsets_record
from ..run import checkpoint as ckpt_io
from ..run import distributed
from ..run.rundir import exclusive
from ..analysis.plots import PLOTS_HINT, plot_lines
from ..analysis.robustness import robustness_markdown
from ..run.build import load_data
from ..run.trained import load_run, pick_split, provenance, result_tag

# The differences given intervals: (name, first predictor, second predictor).
COMPARISONS = (("tie-te", "tie", "te"), ("tie_alpha-te", "tie_alpha", "te"), ("tie-baseline", "tie", "baseline"))


def check_options(rates, draws: int, rounds: int, grid) -> list:
    rates = sorted({check_rate(r, "--rates") for r in rates})
    if draws < 1:
        raise UserError(f"--draws must be at least 1 (masks drawn per missing rate), got {draws}")
    if rounds < 1:
        raise UserError(f"--bootstrap must be at least 1 (resampling rounds), got {rounds}")
    if not grid or any(a < 0 for a in grid):
        raise UserError(f"the α grid must hold non-negative values, got {list(grid)}")
    return rates


def load_baseline(baseline_dir: Path, checkpoint: str, device, cfg: dict, dataset):
    """The backbone-alone run compared with, evaluated on the very data file of the run judged; refused when
    it was trained on other data (another dataset, layout or task, or another file)."""
    saved_cfg = ckpt_io.read_config_file(Path(baseline_dir) / "config.yaml") if Path(baseline_dir).is_dir() else None
    if saved_cfg is None:
        raise UserError(f"--baseline {baseline_dir}: no run directory there (config.yaml); give the directory of a "
                        "trained backbone-alone run")
    ours = (cfg["dataset"], cfg["data"]["aligned"], cfg["data"]["task"])
    theirs = (saved_cfg.get("dataset"), saved_cfg.get("data", {}).get("aligned"), saved_cfg.get("data", {}).get("task"))
    trained_on = {}
    with contextlib.suppress(OSError, ValueError):
        trained_on = json.loads((Path(baseline_dir) / "metrics.json").read_text()).get("data") or {}
    if theirs != ours or (trained_on.get("sha1") and trained_on.get("sha1") != dataset.source.get("sha1")):
        raise UserError(f"--baseline {baseline_dir} was trained on other data ({theirs[0]}, aligned {theirs[1]}, "
                        f"task {theirs[2]}, file {trained_on.get('path', '?')}) than the run judged ({ours[0]}, "
                        f"aligned {ours[1]}, task {ours[2]}, file {dataset.source.get('path')}); compare runs of "
                        "the same data file")
    data = cfg["data"]  # the very file the judged run is scored on
    _, splits, model, _ = load_run(baseline_dir, checkpoint, device, data["dir"], data_file=data["file"],
                                   data_format=data["format"])
    return splits, model


def robustness_run(run_dir: Path, checkpoint: str = "best_acc", split: str = "test", device: str = "auto",
                   data_dir: str | None = None, subsets_file: str | None = None, baseline: str | None = None,
                   rates=RATES, draws: int = DRAWS, rounds: int = DEFAULT_ROUNDS, grid=ALPHA_GRID,
                   dataset: str | None = None, data_file: str | None = None, data_format: str | None = None) -> dict:
    """The robustness result of one run (module docstring) on its own data or on the file `data_dir` /
    `data_file` (read as `data_format`) point at; `dataset`, when given, is the dataset the run must be of."""
    rates = check_options(rates, draws, rounds, grid)
    run_dir = Path(run_dir)
    ctx = distributed.setup(device)
    try:
        cfg, splits, model, saved = load_run(run_dir, checkpoint, ctx.device, data_dir, dataset,
                                             data_file=data_file, data_format=data_format)
        pick_split(splits, split)
        if split == "valid":
            raise UserError("--split valid: α is chosen on the validation split, so it cannot also be the split "
                            "reported; report on test (or another held-out split)")
        dataset, batch_size, task = splits[split], cfg["train"]["eval_batch_size"], splits[split].task
        key, _ = metrics.headline(task)
        models = {"run": model}
        if baseline is not None:
            _, models["baseline"] = load_baseline(Path(baseline), checkpoint, ctx.device, cfg, dataset)

        def baseline_scores(keep=None) -> dict:
            if "baseline" not in models:
                return {}
            other = predict_all(models["baseline"], dataset, batch_size, ctx, keep=keep)
            return {"baseline": main_predictions(other, task, None)["m"]}

        # The probes learn from the run's own training split and α is chosen on its own validation split, also
        # when the split reported comes from another file (an OOD file may hold that one split alone).
        own = splits if data_dir is None and data_file is None else load_data(ckpt_io.read_config_file(
            run_dir / "config.yaml"))
        subsets = bias_subsets(own["train"], dataset, subsets_file)
        conflicting = {name: rows for name, rows in subsets.items() if name.startswith("conflicting_")}
        pred = predict_all(model, dataset, batch_size, ctx)
        alpha = None
        if "logits_tie" in pred:
            valid_pred = predict_all(model, own["valid"], batch_size, ctx)
            valid_conflicting = {n: r for n, r in probe_subsets(own["train"], own["valid"]).items()
                                 if n.startswith("conflicting_")}
            valid_curves = alpha_curves(valid_pred, task, grid, valid_conflicting)
            alpha = {"grid": list(grid), "valid": valid_curves, "test": alpha_curves(pred, task, grid, conflicting),
                     "selected": select_alpha(valid_curves["all"], grid),
                     "selected_on": own["valid"].source["path"],
                     "selected_conflicting": {n: select_alpha(c, grid) for n, c in valid_curves["subsets"].items()},
                     "selected_per_modality": {m: select_alpha(valid_curves[m], grid) for m in valid_curves
                                               if m not in ("all", "subsets")}}
        selected = alpha["selected"] if alpha else None
        full = {**main_predictions(pred, task, selected), **baseline_scores()}

        rows_of = {"all": None, **subsets}
        accuracy = {name: {p: mean_on(values, rows) for p, values in full.items()} for name, rows in rows_of.items()}

        per_rate = {p: [] for p in full}
        for rate in rates:
            # At rate 0 every draw keeps everything: the plain pass above is each of them.
            masks = [] if rate == 0 else [missing_masks(len(dataset), rate, d) for d in range(draws)]
            draws_here = [full] if rate == 0 else [
                {**main_predictions(predict_all(model, dataset, batch_size, ctx, keep=keep), task, selected),
                 **baseline_scores(keep)} for keep in masks]
            for p in per_rate:
                per_rate[p].append([float(s[p].mean()) for s in draws_here])
        curves = summarize_draws(per_rate)
        missing = {"rates": rates, "draws": draws, "seed": MISSING_SEED, "curves": curves,
                   "auilc": {p: auilc(rates, c["mean"]) for p, c in curves.items()}}

        intervals = {}
        for name, first, second in COMPARISONS:
            if first in full and second in full:
                intervals[name] = {s: paired_interval(full[first] if rows is None else full[first][rows],
                                                      full[second] if rows is None else full[second][rows],
                                                      rounds, DEFAULT_SEED)
                                   for s, rows in {"all": None, **conflicting}.items()}
        result = {"run": str(run_dir), **provenance(run_dir, checkpoint, saved, dataset), "dataset": cfg["dataset"],
                  "task": task, "metric": key, "model": cfg["model"]["name"], "backbone": cfg["model"]["backbone"],
                  "baseline": str(baseline) if baseline else None, "predictions": list(full),
                  "subset_sizes": {"all": len(dataset), **{n: len(r) for n, r in subsets.items()}},
                  "accuracy": accuracy, "alpha": alpha, "missing": missing,
                  "bootstrap": {"rounds": rounds, "seed": DEFAULT_SEED, "level": LEVEL, "intervals": intervals}}
        if ctx.is_main:
            with exclusive(run_dir):
                write_results(result, subsets_record(subsets, dataset),
                              output_dir(run_dir, checkpoint, data_dir, dataset, saved, data_file))
        return result
    finally:
        distributed.teardown(ctx)


def output_dir(run_dir: Path, checkpoint: str, data_dir: str | None, dataset, saved: dict,
               data_file: str | None = None) -> Path:
    """<run>/robustness for the run's own checkpoint on its own data, else robustness_<tag>."""
    tag = result_tag(run_dir, checkpoint, data_dir, dataset.source, saved.get("run"), data_file)
    return run_dir / ("robustness" if tag == "best_acc" else f"robustness_{tag}")


def write_results(result: dict, record: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    split = result["split"]
    write_text(out / f"subsets_{split}.json", json.dumps(record, indent=1))
    write_text(out / "robustness.json", json.dumps(result, indent=2))
    pngs = {}
    if result["alpha"]:
        lines = {"TE − α·NDE, valid": result["alpha"]["valid"]["all"], f"TE − α·NDE, {split}": result["alpha"]["test"]["all"]}
        lines.update({f"{name}, {split}": values for name, values in result["alpha"]["test"]["subsets"].items()})
        pngs["alpha"] = plot_lines(result["alpha"]["grid"], lines, out / "alpha.png",
                                   f"{result['metric']} against effect scaling α (α=0: TE, α=1: TIE)", "α",
                                   f"{result['metric']} (%)", marks={"chosen on valid": result["alpha"]["selected"]})
    pngs["missing"] = plot_lines(result["missing"]["rates"], result["missing"]["curves"], out / "missing.png",
                                 f"{result['metric']} against the missing rate ({result['missing']['draws']} draws)",
                                 "missing rate η", f"{result['metric']} (%)")
    write_text(out / "robustness.md", robustness_markdown(result, {k: v for k, v in pngs.items() if v}))
    print(robustness_markdown(result, {}))
    print(f"wrote {out / 'robustness.json'}, robustness.md and subsets_{split}.json"
          + ("" if all(pngs.values()) else f" (plots skipped: {PLOTS_HINT})"))
