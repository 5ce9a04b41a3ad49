"""Evaluate and analyse trained runs from their directories (config.yaml + checkpoints)."""
from __future__ import annotations

import json
from pathlib import Path

from ..atomic import write_text
from ..errors import UserError
from ..modalities import MODALITIES
from ..run import checkpoint as ckpt_io
from ..run import distributed
from ..run.build import compile_model
from ..run.config import model_signature
from ..eval.evaluate import (
    main_prediction,
    parse_removal,
    predict,
    removal_sweep,
    score_predictions,
    subset_scores,
)
from ..analysis.confusion import confusion_matrices, write_confusion_png
from ..analysis.plots import PLOTS_HINT
from ..analysis.report import write_report
from ..train.loop import load_data, make_model
from ..eval.tables import prediction_table, print_removal_report


def checkpoint_path(run_dir: Path, checkpoint: str) -> Path:
    """best_acc, best_loss, last (the run's own checkpoints) or a path to any .pt file."""
    if checkpoint.endswith(".pt"):
        return Path(checkpoint)
    if checkpoint not in ckpt_io.CHECKPOINT_NAMES:
        raise UserError(f"--checkpoint '{checkpoint}' is unknown; use best_acc, best_loss, last or a .pt path")
    return Path(run_dir) / ckpt_io.CHECKPOINT_NAMES[checkpoint]


def load_run(run_dir: Path, checkpoint: str, device, data_dir: str | None = None):
    """(config, splits, model with the checkpoint's weights, checkpoint) of a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} not found; train it first with main.py train (or main.sh)")
    cfg = ckpt_io.read_config_file(run_dir / "config.yaml")
    if data_dir is not None:
        cfg["data"]["dir"] = data_dir
    path = checkpoint_path(run_dir, checkpoint)
    saved = ckpt_io.load_checkpoint(path)
    ckpt_io.check_compatible(saved, path, model_signature(cfg))
    splits = load_data(cfg)
    model = make_model(cfg, splits["train"], device)
    ckpt_io.load_model_state(model, saved["model"], path)
    return cfg, splits, model, saved


def provenance(run_dir: Path, checkpoint: str, saved: dict, dataset) -> dict:
    """What a result came from: the checkpoint (path, epoch) and the data file, for its result file."""
    return {"checkpoint": {"path": str(checkpoint_path(run_dir, checkpoint).resolve()), "epoch": saved["epoch"]},
            "data": dataset.source, "split": dataset.split}


def result_tag(run_dir: Path, checkpoint: str, data_dir: str | None, source: dict) -> str:
    """The name part of a result file: the checkpoint's name for the run's own checkpoint on its own data;
    otherwise also a digest of the checkpoint and data file, so a foreign evaluation never overwrites
    the run's own results (and two foreign ones of different origin never overwrite each other)."""
    import hashlib

    path = checkpoint_path(run_dir, checkpoint).resolve()
    own_checkpoint = path.parent == Path(run_dir).resolve() and path.name in ckpt_io.CHECKPOINT_NAMES.values()
    run_data = ckpt_io.read_config_file(Path(run_dir) / "config.yaml")["data"]["dir"]
    own_data = data_dir is None or Path(data_dir).resolve() == Path(run_data).resolve()
    if own_checkpoint and own_data:
        return path.stem
    digest = hashlib.sha1(f"{path}\n{source['path']}".encode()).hexdigest()[:8]
    return f"{path.stem}-{digest}"


def evaluate_run(run_dir: Path, checkpoint: str = "best_acc", split: str = "test", remove: str | None = None,
                 device: str = "auto", amp: bool = False, data_dir: str | None = None, analyze: bool = False,
                 compiled: bool = False) -> dict:
    """Score a run's checkpoint; `compiled` (or the run's train.compile) evaluates it torch.compiled."""
    import contextlib

    from ..run.rundir import exclusive

    ctx = distributed.setup(device)
    try:
        cfg, splits, model, saved = load_run(run_dir, checkpoint, ctx.device, data_dir)
        if compiled or cfg["train"].get("compile"):
            model = compile_model(model)  # the weights were loaded into the module it wraps
        dataset = splits[split]
        batch_size = cfg["train"]["eval_batch_size"]
        origin = provenance(run_dir, checkpoint, saved, dataset)
        tag = result_tag(run_dir, checkpoint, data_dir, dataset.source)
        name = Path(checkpoint).stem
        # The results are written into the run directory: not while a training run is writing there.
        with exclusive(run_dir) if ctx.is_main else contextlib.nullcontext():
            if remove == "sweep":
                report = removal_sweep(model, dataset, batch_size, ctx, amp=amp)
                if ctx.is_main:
                    print(f"missing-modality test on {split} ({name}, epoch {saved['epoch']}); scores in %:")
                    print_removal_report(report)
                    out = Path(run_dir) / f"robustness_{tag}_{split}.json"
                    write_text(out, json.dumps({**origin, **report}, indent=2))
                    print(f"\nwrote {out}")
                result = report
            else:
                removed = parse_removal(remove)
                pred = predict(model, dataset, batch_size, ctx, remove=removed, amp=amp)
                result = {"loss": pred["loss"], "predictions": score_predictions(pred, dataset.task)}
                if ctx.is_main:
                    what = f", without {' and '.join(removed)}" if removed else ""
                    print(f"{cfg['dataset']} {split} split ({name}, epoch {saved['epoch']}{what}):")
                    print(prediction_table(result["predictions"]))
                    suffix = f"_no_{remove}" if remove else ""
                    matrices = confusion_matrices(pred, dataset.task)
                    confusion = {prediction: counts.tolist() for prediction, counts in matrices.items()}
                    out = Path(run_dir) / f"eval_{tag}_{split}{suffix}.json"
                    write_text(out, json.dumps({**origin, "removed": list(removed), **result, "confusion": confusion},
                                               indent=2))
                    print(f"wrote {out}")
                    png = write_confusion_png(matrices, dataset.task, Path(run_dir) / f"confusion_{tag}_{split}{suffix}.png",
                                              f"{cfg['dataset']} {split} ({name}, epoch {saved['epoch']}{what})")
                    print(f"plots skipped: {PLOTS_HINT}" if png is None else f"wrote {png}")
        if analyze:
            analyze_runs([Path(run_dir)], checkpoint=checkpoint, split=split, device=device, data_dir=data_dir)
        return result
    finally:
        distributed.teardown(ctx)


def analyze_run(run_dir: Path, checkpoint: str, split: str, ctx, data_dir: str | None, attention: bool = False,
                sample: int | None = None) -> dict:
    """Shapley contributions, NDE shares, balance and robustness of one run's main prediction; with
    `attention`, also its crossmodal attention maps (written to the run directory)."""
    from ..eval.contributions import (balance_index, nde_shares, removal_report,
                                            removal_scores_from_subsets, shapley_values)
    from ..eval import metrics

    cfg, splits, model, saved = load_run(run_dir, checkpoint, ctx.device, data_dir)
    dataset = splits[split]
    batch_size = cfg["train"]["eval_batch_size"]
    prediction = main_prediction(model)
    key, higher_is_better = metrics.headline(dataset.task)
    subsets = subset_scores(model, dataset, batch_size, ctx)[prediction]
    shapley = shapley_values(subsets)
    full = subsets[frozenset(MODALITIES)]
    result = {"run": str(run_dir), "dataset": cfg["dataset"], "task": dataset.task,
              **provenance(run_dir, checkpoint, saved, dataset),
              "model": cfg["model"]["name"], "backbone": cfg["model"]["backbone"], "prediction": prediction,
              "metric": key, "split": split,
              "subset_scores": {"+".join(sorted(s)) or "none": v for s, v in subsets.items()},
              "shapley": shapley, "shapley_balance": balance_index(shapley),
              "robustness": removal_report(full, removal_scores_from_subsets(subsets), higher_is_better)}
    if prediction == "tie":
        pred = predict(model, dataset, batch_size, ctx, keys=("nde_t", "nde_a", "nde_v"))
        shares = nde_shares(pred["nde_t"], pred["nde_a"], pred["nde_v"])
        result["nde_shares"] = shares
        result["nde_balance"] = balance_index(shares)
    if attention and ctx.is_main:
        tag = result_tag(run_dir, checkpoint, data_dir, dataset.source)
        result["attention"] = write_attention(model, dataset, cfg, Path(run_dir), tag, split, ctx.device, sample)
    return result


def write_attention(model, dataset, cfg: dict, run_dir: Path, tag: str, split: str, device,
                    sample: int | None) -> dict | None:
    """attention_<tag>_<split>[_sample<N>].npz and .png in the run directory; None for a backbone
    without crossmodal encoders (PMR)."""
    from ..analysis.attention import LABELS, attention_maps, has_crossmodal_attention, write_attention_npz
    from ..analysis.plots import PLOTS_HINT, plot_attention_grid

    if not has_crossmodal_attention(model):
        print(f"attention maps skipped for {run_dir}: the {cfg['model']['backbone']} backbone has no MulT "
              "crossmodal encoders (maps are for mult and dmd)")
        return None
    # Each batch holds (B, H, T_q, T_k) weights per encoder: long unaligned sequences need small batches.
    maps = attention_maps(model, dataset, min(cfg["train"]["eval_batch_size"], 16), device, sample)
    stem = f"attention_{tag}_{split}" + ("" if sample is None else f"_sample{sample}")
    npz = write_attention_npz(maps, run_dir / f"{stem}.npz")
    what = f"sample {sample}" if sample is not None else f"mean over {len(dataset)} samples"
    png = plot_attention_grid(maps, run_dir / f"{stem}.png", f"last-layer crossmodal attention, {split} split "
                              f"({tag}), mean over heads, {what}", LABELS)
    print(f"wrote {npz}" + (f" and {png}" if png else f" (PNG skipped: {PLOTS_HINT})"))
    return {"npz": npz.name, "png": png.name if png else None, "sample": sample}


def analyze_runs(run_dirs: list[Path], checkpoint: str = "best_acc", split: str = "test", device: str = "auto",
                 data_dir: str | None = None, out_dir: str | None = None, attention: bool = False,
                 sample: int | None = None) -> dict:
    from ..analysis.plots import PLOTS_HINT, plot_contributions, plot_removal_drops

    check_same_data(run_dirs)
    out = Path(out_dir) if out_dir else Path(run_dirs[0])
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; analyze writes analysis.json and the plots into a folder "
                        "there: give a folder (new or existing)")
    ctx = distributed.setup(device)
    try:
        results = {}
        for run_dir in run_dirs:
            label = f"{Path(run_dir).parent.name}/{Path(run_dir).name}"
            results[label] = analyze_run(Path(run_dir), checkpoint, split, ctx, data_dir, attention, sample)
        # Into the first run's directory, the analysis of another checkpoint or other data is named apart
        # (as eval's results are), so it never replaces the run's own.
        first = next(iter(results.values()))
        tag = result_tag(run_dirs[0], checkpoint, data_dir, first["data"])
        suffix = "" if out_dir or tag == checkpoint_path(run_dirs[0], checkpoint).stem else f"_{tag}"
        files = {name: out / f"{name}{suffix}.{ext}" for name, ext in
                 (("analysis", "json"), ("contributions", "png"), ("removal_drops", "png"), ("report", "md"))}
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the output folder {out}: {err.strerror or err}") from None
        print_analysis(results)
        write_text(files["analysis"], json.dumps(results, indent=2))
        print(f"\nwrote {files['analysis']}")
        contributions = {label: r["shapley"] for label, r in results.items()}
        drops = {label: {k: v["drop"] for k, v in r["robustness"]["removals"].items()}
                 for label, r in results.items()}
        png = plot_contributions(contributions, files["contributions"], "Shapley contribution per modality")
        if png is None:
            print(f"plots skipped: {PLOTS_HINT}")
        else:
            plot_removal_drops(drops, files["removal_drops"], "Drop when modalities are removed")
            print(f"wrote {files['contributions']} and {files['removal_drops']}")
        report = write_report(files["report"], [Path(r) for r in run_dirs], results,
                              charts={"Shapley contribution per modality": files["contributions"],
                                      "Drop when modalities are removed": files["removal_drops"]})
        print(f"wrote {report}")
        return results
    finally:
        distributed.teardown(ctx)


def check_same_data(run_dirs: list[Path]) -> None:
    """Contributions and scores are only comparable on the same dataset and task: refuse a mixture."""
    first = None
    for run_dir in run_dirs:
        if not (Path(run_dir) / "config.yaml").is_file():
            continue  # load_run says what is missing
        cfg = ckpt_io.read_config_file(Path(run_dir) / "config.yaml")
        if not isinstance(cfg, dict):
            continue
        what = (cfg.get("dataset"), (cfg.get("data") or {}).get("task"))
        if first is None:
            first = (run_dir, what)
        elif what != first[1]:
            raise UserError(f"analyze puts runs side by side on the same data, but {first[0]} is {first[1][0]} "
                            f"({first[1][1]}) and {run_dir} is {what[0]} ({what[1]}); analyze them separately")


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
