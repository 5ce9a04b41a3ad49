"""The modality analysis of trained runs, side by side: Shapley contributions per modality, NDE shares,
balance, missing-modality robustness, and optionally crossmodal attention maps; written as
analysis.json, two charts and report.md."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..atomic import write_text
from ..errors import UserError
from ..modalities import MODALITIES
from ..run import checkpoint as ckpt_io
from ..run import distributed
from ..run.trained import checkpoint_path, load_run, other_data_line, pick_split, provenance, result_tag
from ..eval import metrics
from ..eval.contributions import (balance_index, nde_shares, removal_report, removal_scores_from_subsets,
                                  shapley_values)
from ..eval.evaluate import main_prediction, predict, subset_scores
from ..analysis.attention import LABELS, attention_maps, has_crossmodal_attention, write_attention_npz
from ..analysis.plots import FIGURE_FORMATS, PLOTS_HINT, plot_attention_grid, plot_contributions, plot_removal_drops
from ..analysis.report import UNITS_NOTE, write_report


def analyze_run(run_dir: Path, checkpoint: str, split: str, ctx, data_dir: str | None, attention: bool = False,
                sample: int | None = None, attention_dir: Path | None = None, attention_prefix: str = "",
                figure_format: str = "png", data_file: str | None = None, data_format: str | None = None) -> dict:
    """Shapley contributions, NDE shares, balance and robustness of one run's main prediction; with
    `attention`, also its crossmodal attention maps, written to `attention_dir` (default: the run
    directory) with file names starting `attention_<attention_prefix>`; `data_file` (read as
    `data_format`): the data file to analyse it on instead of the run's own."""
    cfg, splits, model, saved = load_run(run_dir, checkpoint, ctx.device, data_dir, data_file=data_file,
                                         data_format=data_format)
    dataset = pick_split(splits, split)
    batch_size = cfg["train"]["eval_batch_size"]
    prediction = main_prediction(model)
    key, higher_is_better = metrics.headline(dataset.task)
    subsets = subset_scores(model, dataset, batch_size, ctx)[prediction]
    shapley = shapley_values(subsets)
    full = subsets[frozenset(MODALITIES)]
    origin = provenance(run_dir, checkpoint, saved, dataset)
    if ctx.is_main and other_data_line(origin):
        print(other_data_line(origin))
    result = {"units": UNITS_NOTE, "run": str(run_dir), "dataset": cfg["dataset"], "task": dataset.task, **origin,
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
        tag = result_tag(run_dir, checkpoint, data_dir, dataset.source, saved.get("run"), data_file)
        result["attention"] = write_attention(model, dataset, cfg, Path(attention_dir or run_dir),
                                              f"{attention_prefix}{tag}", split, ctx.device, sample, figure_format)
    return result


def write_attention(model, dataset, cfg: dict, run_dir: Path, tag: str, split: str, device,
                    sample: int | None, figure_format: str = "png") -> dict | None:
    """attention_<tag>_<split>[_sample<N>].npz and the figure in `run_dir`; None for a backbone without
    crossmodal encoders (PMR). Returns the files' paths."""
    if not has_crossmodal_attention(model):
        print(f"attention maps skipped for {run_dir}: the {cfg['model']['backbone']} backbone has no MulT "
              "crossmodal encoders (maps are for mult and dmd)")
        return None
    # Each batch holds (B, H, T_q, T_k) weights per encoder: long unaligned sequences need small batches.
    maps = attention_maps(model, dataset, min(cfg["train"]["eval_batch_size"], 16), device, sample)
    stem = f"attention_{tag}_{split}" + ("" if sample is None else f"_sample{sample}")
    npz = write_attention_npz(maps, run_dir / f"{stem}.npz")
    what = f"sample {sample}" if sample is not None else f"mean over {len(dataset)} samples"
    png = plot_attention_grid(maps, run_dir / f"{stem}.{figure_format}", f"last-layer crossmodal attention, {split} "
                              f"split ({tag}), mean over heads, {what}, padded steps left out (grey)", LABELS)
    print(f"wrote {npz}" + (f" and {png}" if png else f" (figure skipped: {PLOTS_HINT})"))
    return {"npz": str(npz), "figure": str(png) if png else None, "sample": sample}


def analyze_runs(run_dirs: list[Path], checkpoint: str = "best_acc", split: str = "test", device: str = "auto",
                 data_dir: str | None = None, out_dir: str | None = None, attention: bool = False,
                 sample: int | None = None, labels: list[str] | None = None, figure_format: str = "png",
                 data_file: str | None = None, data_format: str | None = None) -> dict:
    """Analyse runs side by side: analysis.json, the charts and report.md in `out_dir` (default: the
    first run's directory), and with `out_dir` every attention file too.

    `labels` (one per run) name the runs in the charts; runs sharing a label (by default the run's name,
    so the seeds of one run) are one bar with its mean and an error bar of the sample std over them.
    `data_file` (read as `data_format`) analyses them on that file instead of their own data."""
    if sample is not None and not attention:
        raise UserError("--sample picks the sample of the attention maps; it needs --attention")
    check_same_data(run_dirs)
    if labels is not None and len(labels) != len(run_dirs):
        raise UserError(f"--label is given {len(labels)} times for {len(run_dirs)} runs: give one label per run, "
                        "in the order of the runs (runs with the same label are averaged in the charts)")
    if figure_format not in FIGURE_FORMATS:
        raise UserError(f"--figure-format {figure_format!r} is unknown; use one of {', '.join(FIGURE_FORMATS)}")
    out = Path(out_dir) if out_dir else Path(run_dirs[0])
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; analyze writes analysis.json and the plots into a folder "
                        "there: give a folder (new or existing)")
    ctx = distributed.setup(device)
    try:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise UserError(f"cannot create the output folder {out}: {err.strerror or err}") from None
        results, groups = {}, {}
        for index, run_dir in enumerate(run_dirs):
            key = run_key(run_dir)
            # With --out everything goes there, the attention files named after their run.
            prefix = key.replace("/", "_") + "_" if out_dir else ""
            results[key] = analyze_run(Path(run_dir), checkpoint, split, ctx, data_dir, attention, sample,
                                       attention_dir=out if out_dir else None, attention_prefix=prefix,
                                       figure_format=figure_format, data_file=data_file, data_format=data_format)
            groups.setdefault(labels[index] if labels else Path(run_dir).parent.name, []).append(key)
        # Into the first run's directory, the analysis of another checkpoint or other data is named apart
        # (as eval's results are), so it never replaces the run's own.
        first = next(iter(results.values()))
        tag = result_tag(run_dirs[0], checkpoint, data_dir, first["data"], first["checkpoint"]["run"], data_file)
        suffix = "" if out_dir or tag == checkpoint_path(run_dirs[0], checkpoint).stem else f"_{tag}"
        if split != "test":  # another split's analysis (an OOD split, valid) never replaces the test split's
            suffix += f"_{split}"
        files = {name: out / f"{name}{suffix}.{ext}" for name, ext in
                 (("analysis", "json"), ("contributions", figure_format), ("removal_drops", figure_format),
                  ("report", "md"))}
        print_analysis(results)
        write_text(files["analysis"], json.dumps(results, indent=2))
        print(f"\nwrote {files['analysis']}")
        metric = first["metric"]
        contributions = chart_values(groups, {key: r["shapley"] for key, r in results.items()})
        drops = chart_values(groups, {key: {k: v["drop"] for k, v in r["robustness"]["removals"].items()}
                                      for key, r in results.items()})
        seeds = " (mean ± std over seeds)" if any(len(keys) > 1 for keys in groups.values()) else ""
        figure = plot_contributions(contributions, files["contributions"], f"Shapley contribution per modality{seeds}",
                                    ylabel=f"contribution (points of {metric})")
        if figure is None:
            print(f"plots skipped: {PLOTS_HINT}")
        else:
            plot_removal_drops(drops, files["removal_drops"], f"Drop when modalities are removed{seeds}",
                               ylabel=f"drop from the full-input {metric} (points)")
            print(f"wrote {files['contributions']} and {files['removal_drops']}")
        report = write_report(files["report"], [Path(r) for r in run_dirs], results,
                              charts={"Shapley contribution per modality": files["contributions"],
                                      "Drop when modalities are removed": files["removal_drops"]},
                              gather=out_dir is not None)
        print(f"wrote {report}")
        return results
    finally:
        distributed.teardown(ctx)


def run_key(run_dir) -> str:
    """How analyze names a run: `<run name>/<seed folder>`, never its path."""
    return f"{Path(run_dir).parent.name}/{Path(run_dir).name}"


def chart_values(groups: dict, values: dict) -> dict:
    """{label: {category: value in points}}: a group of one run keeps its value, a larger one becomes
    (mean, sample std) over its runs, which the charts draw as a bar with an error bar."""
    charted = {}
    for label, keys in groups.items():
        categories = [c for c in values[keys[0]] if all(c in values[k] for k in keys)]
        charted[label] = {c: (100.0 * values[keys[0]][c] if len(keys) == 1 else
                              (100.0 * float(np.mean([values[k][c] for k in keys])),
                               100.0 * float(np.std([values[k][c] for k in keys], ddof=1))))
                          for c in categories}
    return charted


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
