"""Evaluate and analyse trained runs from their directories (config.yaml + checkpoints)."""
from __future__ import annotations

import json
from pathlib import Path

from src.errors import UserError
from src.train import checkpoint as ckpt_io
from src.train import distributed
from src.train.build import compile_model
from src.train.config import model_signature
from src.train.evaluate import (
    evaluate,
    main_prediction,
    parse_removal,
    predict,
    removal_sweep,
    subset_scores,
)
from src.train.loop import load_data, make_model
from src.train.report import prediction_table, print_removal_report


def load_run(run_dir: Path, checkpoint: str, device, data_dir: str | None = None):
    """(config, splits, model with the checkpoint's weights) of a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; train it first with main.py train (or main.sh)")
    cfg = ckpt_io.read_config_file(run_dir / "config.yaml")
    if data_dir is not None:
        cfg["data"]["dir"] = data_dir
    path = Path(checkpoint) if checkpoint.endswith(".pt") else run_dir / ckpt_io.CHECKPOINT_NAMES.get(checkpoint, "")
    if checkpoint not in ckpt_io.CHECKPOINT_NAMES and not checkpoint.endswith(".pt"):
        raise UserError(f"--checkpoint '{checkpoint}' is unknown; use best_acc, best_loss, last or a .pt path")
    saved = ckpt_io.load_checkpoint(path)
    ckpt_io.check_compatible(saved, path, model_signature(cfg), model_signature)
    splits = load_data(cfg)
    model = make_model(cfg, splits["train"], device)
    ckpt_io.load_model_state(model, saved["model"], path)
    return cfg, splits, model, saved


def evaluate_run(run_dir: Path, checkpoint: str = "best_acc", split: str = "test", remove: str | None = None,
                 device: str = "auto", amp: bool = False, data_dir: str | None = None, analyze: bool = False,
                 compiled: bool = False) -> dict:
    """Score a run's checkpoint; `compiled` (or the run's train.compile) evaluates it torch.compiled."""
    ctx = distributed.setup(device)
    try:
        cfg, splits, model, saved = load_run(run_dir, checkpoint, ctx.device, data_dir)
        if compiled or cfg["train"].get("compile"):
            model = compile_model(model)  # the weights were loaded into the module it wraps
        dataset = splits[split]
        batch_size = cfg["train"]["eval_batch_size"]
        tag = Path(checkpoint).stem
        if remove == "sweep":
            report = removal_sweep(model, dataset, batch_size, ctx, amp=amp)
            if ctx.is_main:
                print(f"missing-modality test on {split} ({tag}, epoch {saved['epoch']}); scores in %:")
                print_removal_report(report)
                out = Path(run_dir) / f"robustness_{tag}_{split}.json"
                ckpt_io.atomic_write_text(json.dumps(report, indent=2), out)
                print(f"\nwrote {out}")
            result = report
        else:
            removed = parse_removal(remove)
            result = evaluate(model, dataset, batch_size, ctx, remove=removed, amp=amp)
            if ctx.is_main:
                what = f", without {' and '.join(removed)}" if removed else ""
                print(f"{cfg['dataset']} {split} split ({tag}, epoch {saved['epoch']}{what}):")
                print(prediction_table(result["predictions"]))
                suffix = f"_no_{remove}" if remove else ""
                out = Path(run_dir) / f"eval_{tag}_{split}{suffix}.json"
                ckpt_io.atomic_write_text(json.dumps(result, indent=2), out)
        if analyze:
            analyze_runs([Path(run_dir)], checkpoint=checkpoint, split=split, device=device, data_dir=data_dir)
        return result
    finally:
        distributed.teardown(ctx)


def analyze_run(run_dir: Path, checkpoint: str, split: str, ctx, data_dir: str | None) -> dict:
    """Shapley contributions, NDE shares, balance and robustness of one run's main prediction."""
    from src.analysis.contributions import (balance_index, nde_shares, removal_report,
                                            removal_scores_from_subsets, shapley_values)
    from src import metrics

    cfg, splits, model, saved = load_run(run_dir, checkpoint, ctx.device, data_dir)
    dataset = splits[split]
    batch_size = cfg["train"]["eval_batch_size"]
    prediction = main_prediction(model)
    key, higher_is_better = metrics.headline(dataset.task)
    subsets = subset_scores(model, dataset, batch_size, ctx)[prediction]
    shapley = shapley_values(subsets)
    full = subsets[frozenset(("text", "audio", "vision"))]
    result = {"run": str(run_dir), "model": cfg["model"]["name"], "backbone": cfg["model"]["backbone"],
              "prediction": prediction, "metric": key, "split": split,
              "subset_scores": {"+".join(sorted(s)) or "none": v for s, v in subsets.items()},
              "shapley": shapley, "shapley_balance": balance_index(shapley),
              "robustness": removal_report(full, removal_scores_from_subsets(subsets), higher_is_better)}
    if prediction == "tie":
        pred = predict(model, dataset, batch_size, ctx, keys=("nde_t", "nde_a", "nde_v"))
        shares = nde_shares(pred["nde_t"], pred["nde_a"], pred["nde_v"])
        result["nde_shares"] = shares
        result["nde_balance"] = balance_index(shares)
    return result


def analyze_runs(run_dirs: list[Path], checkpoint: str = "best_acc", split: str = "test", device: str = "auto",
                 data_dir: str | None = None, out_dir: str | None = None) -> dict:
    from src.analysis.plots import PLOTS_HINT, plot_contributions, plot_removal_drops

    ctx = distributed.setup(device)
    try:
        results = {}
        for run_dir in run_dirs:
            label = f"{Path(run_dir).parent.name}/{Path(run_dir).name}"
            results[label] = analyze_run(Path(run_dir), checkpoint, split, ctx, data_dir)
        out = Path(out_dir) if out_dir else Path(run_dirs[0])
        out.mkdir(parents=True, exist_ok=True)
        print_analysis(results)
        ckpt_io.atomic_write_text(json.dumps(results, indent=2), out / "analysis.json")
        print(f"\nwrote {out / 'analysis.json'}")
        contributions = {label: r["shapley"] for label, r in results.items()}
        drops = {label: {k: v["drop"] for k, v in r["robustness"]["removals"].items()}
                 for label, r in results.items()}
        png = plot_contributions(contributions, out / "contributions.png", "Shapley contribution per modality")
        if png is None:
            print(f"plots skipped: {PLOTS_HINT}")
        else:
            plot_removal_drops(drops, out / "removal_drops.png", "Drop when modalities are removed")
            print(f"wrote {out / 'contributions.png'} and {out / 'removal_drops.png'}")
        return results
    finally:
        distributed.teardown(ctx)


def print_analysis(results: dict) -> None:
    for label, r in results.items():
        print(f"\n{label} ({r['model']} on {r['backbone']}, prediction {r['prediction']}, {r['metric']} on {r['split']})")
        print(f"  Shapley contribution:  " + "  ".join(f"{m} {100 * v:+.2f}" for m, v in r["shapley"].items())
              + f"   balance {r['shapley_balance']:.3f}")
        if "nde_shares" in r:
            print(f"  NDE share (bias removed): " + "  ".join(f"{m} {v:.3f}" for m, v in r["nde_shares"].items())
                  + f"   balance {r['nde_balance']:.3f}")
        rob = r["robustness"]
        print(f"  removal drops:         " + "  ".join(f"{k} {100 * v['drop']:+.2f}" for k, v in rob["removals"].items())
              + f"   std {100 * rob['drop_std']:.2f}")
