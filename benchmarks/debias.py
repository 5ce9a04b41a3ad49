"""Does the counterfactual head remove a modality shortcut? Backbone alone vs CausalMER on planted bias.

The experiment: synthetic data in the IEMOCAP aligned layout where one modality carries a clean label
shortcut in train and valid that is independent of the label in test (src/data/synthetic.py). A
model that leans on the shortcut looks good on valid and drops on test. For each seed we train

  - the backbone alone (MulT by default), and
  - CausalMER (the same backbone + three unimodal branches + the causal head),

with identical settings and seeds, through the project's own training loop (src.train.loop.train),
select the best-validation checkpoint as the project does, and evaluate on the shifted test split:

  - the headline metric (IEMOCAP avg_acc) of the backbone alone, of CausalMER's fused prediction
    (TE, logits_te) and of its debiased prediction (TIE, logits_tie);
  - the missing-modality test (each of the six removals' drop, and the std of the drops);
  - Shapley contributions of the modalities (from the scores of all 8 presence subsets);
  - where the shortcut stops paying (the `robustness` command, src/commands/robustness.py, with the
    backbone-alone run of the same seed as its baseline): accuracy on the test samples where a probe fit
    on each modality alone on train is wrong (conflicting_<modality>) and right (aligned_<modality>);
    the TE − α·NDE curve with α chosen on valid (tie_alpha); accuracy against the random missing rate
    (AUILC); paired bootstrap intervals of TIE − TE and TIE − baseline;
  - diagnostics of why TIE does or doesn't help: the learned constants c_t, c_a, c_v at the end of
    training, each branch's accuracy on train vs test (did the branch capture the shortcut?), the
    mean |NDE_m| per modality on test (how much the head subtracts per modality), and the decision
    margins: the part of NDE_m that can flip a decision, and how often TIE decides unlike TE.

    python benchmarks/debias.py                                   # default: MulT, audio shortcut 0.7/0.9
                                                                  # (about 16 min on 2 shared CPU cores)
    python benchmarks/debias.py --bias-strength 0.9 --fusion mask sum hm tanh
    python benchmarks/debias.py --bias-strength 0.9 --branches pool transformer resnet18
    python benchmarks/debias.py --backbone pmr --bias-strength 0.9
    python benchmarks/debias.py --bias-strength 0.9 --causal-set train.lr.constant=0.02
    python benchmarks/debias.py --quick --output /tmp/debias_quick.json   # seconds, a smoke run

Each seed writes its own synthetic file (data seed = training seed), so the spread over seeds covers
both the data draw and the initialisation. Jobs run in up to --jobs processes with one torch thread
each. Finished jobs are cached in --work-dir by their full specification: a later invocation that
shares jobs (e.g. the fusion sweep shares the baseline and the `mask` runs with the default run)
reuses them (--remeasure re-evaluates them from their checkpoints instead). Results go to benchmarks/results/debias_<setting>.json with machine info and wall time;
the tables printed at the end are markdown.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):  # run as a script from anywhere: `src` is the project package
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

RESULTS = REPO / "benchmarks" / "results"
from common import machine_info  # noqa: E402  (imports after the sys.path lines above)
from src.causal.head import FUSIONS  # noqa: E402
from src.models import BACKBONES, BRANCHES  # noqa: E402
from src.modalities import LETTERS, MODALITIES  # noqa: E402

# Branch kinds that train from scratch (albert stands for a pretrained text model and needs an extra).
BRANCH_KINDS = tuple(kind for kind in BRANCHES if kind != "albert")

# Model sizes. The published sizes (MulT d_model 40, 5 layers; 50 epochs on 2717 samples) take hours
# on two CPU cores, so the default shrinks the backbone and the data, and says so in every result.
# MulT always uses 10 heads, so d_model stays a multiple of 10.
BACKBONE_SIZES = {
    "default": {"mult": {"d_model": 20, "layers": 2}, "pmr": {"d_model": 20, "layers": 2},
                "dmd": {"d_model": 18, "layers": 2}},  # DMD: 6 heads
    "quick": {"mult": {"d_model": 10, "layers": 1}, "pmr": {"d_model": 10, "layers": 1},
              "dmd": {"d_model": 6, "layers": 1}},
}
# Branch options per kind (beyond `kind`). Transformer and pool are the classes' own defaults; the
# ResNet-18 is narrowed from 64 to 16 base channels, which keeps it the heaviest kind by far.
BRANCH_OPTIONS = {
    "default": {"pool": {}, "transformer": {}, "resnet18": {"width": 16}},
    "quick": {"pool": {"hidden": 16}, "transformer": {"d_model": 8, "num_heads": 2}, "resnet18": {"width": 4}},
}
DEFAULTS = dict(seeds=[1, 2, 3], bias_modality="audio", bias_strength=[0.7, 0.9], fusion=["mask"],
                backbone="mult", branches=["transformer"], scale=0.3, epochs=20)
QUICK = dict(seeds=[1, 2], bias_strength=[0.9], fusion=["mask"], branches=["pool"], scale=0.02, epochs=2)
# The robustness measurement (module docstring): missing rates, mask draws per rate, bootstrap rounds.
ROBUSTNESS = {"default": dict(rates=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7], draws=5, rounds=1000),
              "quick": dict(rates=[0.0, 0.5], draws=1, rounds=50)}


# ------------------------------------------------------------------------------------------ arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training and data seeds (default 1 2 3)")
    p.add_argument("--bias-modality", choices=MODALITIES, default=None, help="the shortcut modality (default audio)")
    p.add_argument("--bias-strength", type=float, nargs="+", default=None,
                   help="how often the shortcut is right in train/valid, one run per value (default 0.7 0.9)")
    p.add_argument("--fusion", choices=FUSIONS, nargs="+", default=None, help="causal-head fusions (default mask)")
    p.add_argument("--backbone", choices=tuple(BACKBONES), default=None, help="default mult")
    p.add_argument("--branches", choices=BRANCH_KINDS, nargs="+", default=None,
                   help="unimodal branch kinds, the same kind for all three modalities (default transformer)")
    p.add_argument("--scale", type=float, default=None, help="fraction of IEMOCAP's split sizes (default 0.3)")
    p.add_argument("--epochs", type=int, default=None, help="default 20")
    p.add_argument("--quick", action="store_true", help="a tiny setting that runs in seconds")
    p.add_argument("--jobs", type=int, default=2, help="parallel training processes, one thread each")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every run (as main.py train --set)")
    p.add_argument("--causal-set", dest="causal_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for the CausalMER runs only (e.g. train.lr.constant=0.02), so "
                        "that the baselines, which it can't affect, are shared with other settings")
    p.add_argument("--work-dir", default=None, help="data, checkpoints and the job cache "
                   "(default: <tmp>/causalmer_debias, or a fresh temporary folder with --quick)")
    p.add_argument("--remeasure", action="store_true",
                   help="re-evaluate cached runs from their checkpoints instead of reusing their numbers")
    p.add_argument("--output", default=None, help="JSON path (default benchmarks/results/debias_<setting>.json)")
    return p


def resolve(args) -> dict:
    """The full setting: defaults, then the quick setting, then what the command line gave."""
    setting = dict(DEFAULTS)
    if args.quick:
        setting.update(QUICK)
    for key in DEFAULTS:
        value = getattr(args, key)
        if value is not None:
            setting[key] = value
    size = "quick" if args.quick else "default"
    setting["size"] = size
    setting["backbone_params"] = BACKBONE_SIZES[size][setting["backbone"]]
    setting["branch_options"] = {kind: BRANCH_OPTIONS[size][kind] for kind in setting["branches"]}
    setting["overrides"] = list(args.overrides)
    setting["causal_overrides"] = list(args.causal_overrides)
    setting["checkpoint"] = "best_acc"  # selected on the (biased) valid split, as a user would
    setting["robustness"] = ROBUSTNESS[size]
    return setting


def default_output(setting: dict) -> Path:
    if setting["size"] == "quick":
        return RESULTS / "debias_quick.json"
    strengths = "-".join(f"{s:g}" for s in setting["bias_strength"])
    name = (f"debias_{setting['backbone']}_{setting['bias_modality']}{strengths}_"
            f"{'-'.join(setting['fusion'])}_{'-'.join(setting['branches'])}")
    for text in setting["overrides"] + setting["causal_overrides"]:
        name += "_" + re.sub(r"[^A-Za-z0-9.]+", "", text.replace("train.", "").replace("model.", ""))
    return RESULTS / f"{name}.json"


# ------------------------------------------------------------------------------------------ jobs
def plan_jobs(setting: dict) -> list[dict]:
    """One job per trained model. The baseline doesn't depend on fusion or branches: one per seed."""
    jobs = []
    for strength in setting["bias_strength"]:
        for seed in setting["seeds"]:
            common = dict(backbone=setting["backbone"], backbone_params=setting["backbone_params"],
                          bias_modality=setting["bias_modality"], bias_strength=strength, seed=seed,
                          scale=setting["scale"], epochs=setting["epochs"], overrides=setting["overrides"])
            jobs.append(dict(common, model="backbone"))
            for fusion in setting["fusion"]:
                for kind in setting["branches"]:
                    job = dict(common, model="causalmer", fusion=fusion, branches=kind,
                               branch_options=setting["branch_options"][kind])
                    if setting["causal_overrides"]:  # only when given: other jobs keep their cache keys
                        job["causal_overrides"] = setting["causal_overrides"]
                    jobs.append(job)
    for job in jobs:
        job["key"] = job_key(job)
    return jobs


def job_key(job: dict) -> str:
    """A readable name plus a hash of the full specification (the cache key)."""
    spec = json.dumps({k: v for k, v in job.items() if k != "key"}, sort_keys=True)
    digest = hashlib.sha1(spec.encode()).hexdigest()[:10]
    what = job["backbone"] if job["model"] == "backbone" else f"causalmer_{job['backbone']}_{job['fusion']}_{job['branches']}"
    return f"{what}_{job['bias_modality']}{job['bias_strength']:g}_seed{job['seed']}_{digest}"


def data_dir_for(work_dir: Path, job: dict) -> Path:
    return work_dir / "data" / f"{job['bias_modality']}{job['bias_strength']:g}_scale{job['scale']:g}_seed{job['seed']}"


def write_data(work_dir: Path, jobs: list[dict]) -> None:
    """Each (shortcut, scale, seed) file once, before the workers start (they only read)."""
    from src.data import data_file
    from src.data.synthetic import write_synthetic

    for job in jobs:
        target = data_dir_for(work_dir, job)
        if not data_file(target, "iemocap", True).is_file():
            write_synthetic(target, "iemocap", aligned=True, scale=job["scale"], seed=job["seed"],
                            bias_modality=job["bias_modality"], bias_strength=job["bias_strength"])


def config_for(job: dict, data_dir: Path) -> dict:
    from src.run.config import load_config

    overrides = [f"model.backbone_params.{k}={json.dumps(v)}" for k, v in job["backbone_params"].items()]
    if job["model"] == "causalmer":
        branch = json.dumps({"kind": job["branches"], **job["branch_options"]})
        overrides += [f"model.branches.{m}={branch}" for m in MODALITIES]
        overrides.append(f"model.head.fusion={job['fusion']}")
    overrides += job["overrides"] + job.get("causal_overrides", [])
    return load_config("iemocap", backbone=job["backbone"], overrides=overrides,
                       model_name="causalmer" if job["model"] == "causalmer" else "backbone",
                       cli={"data.dir": str(data_dir), "train.epochs": job["epochs"]})


def run_job(job: dict, work_dir: str) -> dict:
    """Train one model and measure it. Runs in a worker process with one torch thread."""
    import logging

    import torch

    from src.run.runtime import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()  # as main.py does before training
    logging.getLogger("causalmer").setLevel(logging.WARNING)  # per-epoch lines of parallel jobs would interleave
    from src.run import distributed
    from src.atomic import write_text
    from src.run.config import dump_config
    from src.train.loop import train

    work_dir = Path(work_dir)
    run_dir = work_dir / "runs" / job["key"]
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished run from an interrupted invocation
    run_dir.mkdir(parents=True)
    cfg = config_for(job, data_dir_for(work_dir, job))
    # As `main.py train` does: the run directory holds its config, so the checkpoints load back.
    write_text(run_dir / "config.yaml", dump_config(cfg))
    ctx = distributed.setup("cpu")
    started = time.time()
    history = train(cfg, run_dir, ctx, seed=job["seed"])["history"]
    train_seconds = time.time() - started
    record = measure(run_dir, ctx)
    record.update(job=job, train_seconds=round(train_seconds, 1), seconds=round(time.time() - started, 1),
                  epochs_run=len(history), best_epoch=record.pop("epoch"),
                  valid_curve=[round(h[f"valid_{record['metric']}"], 4) for h in history])
    if job["model"] == "causalmer":
        # The constants as training left them (last.pt), next to those of the evaluated checkpoint.
        from src.run.checkpoint import load_checkpoint

        last = load_checkpoint(run_dir / "last.pt")["model"]
        record["constants_last"] = {m: float(last[f"head.constant_{LETTERS[m]}"]) for m in MODALITIES}
    return record


def measure(run_dir: Path, ctx) -> dict:
    """Everything reported about one trained run, from its best-validation checkpoint."""
    from src.eval import metrics
    from src.eval.contributions import removal_report, removal_scores_from_subsets, shapley_values, subset_label
    from src.eval.margins import decision_margins
    from src.eval.evaluate import evaluate, predict, subset_scores
    from src.run.trained import load_run

    cfg, splits, model, saved = load_run(run_dir, "best_acc", ctx.device)
    batch = cfg["train"]["eval_batch_size"]
    key, higher_is_better = metrics.headline(splits["test"].task)
    everything = frozenset(MODALITIES)

    valid = evaluate(model, splits["valid"], batch, ctx)["predictions"]
    subsets = subset_scores(model, splits["test"], batch, ctx)  # {prediction: {present set: score}}
    record = {"epoch": saved["epoch"], "metric": key, "valid": {}, "test": {}, "empty": {}, "shapley": {},
              "removal": {}, "subsets": {}}
    for name, scores in subsets.items():
        record["valid"][name] = valid[name][key]
        record["test"][name] = scores[everything]
        record["empty"][name] = scores[frozenset()]
        record["shapley"][name] = shapley_values(scores)
        record["removal"][name] = removal_report(scores[everything], removal_scores_from_subsets(scores),
                                                 higher_is_better)
        record["subsets"][name] = {subset_label(s): v for s, v in scores.items()}

    constants = model.constants()  # by letter; none for the backbone alone
    if constants:
        record["constants"] = {m: float(constants[LETTERS[m]].detach()) for m in MODALITIES}
        keys = ("logits_t", "logits_a", "logits_v", "nde_t", "nde_a", "nde_v", "te", "logits_te", "logits_tie")
        record["branch_acc"], record["mean_abs_nde"] = {}, {}
        for split in ("train", "test"):
            out = predict(model, splits[split], batch, ctx, keys=keys)
            task = splits[split].task
            record["branch_acc"][split] = {m: metrics.compute_metrics(out[f"logits_{LETTERS[m]}"], out["target"], task)[key]
                                           for m in MODALITIES}
            # How much the head subtracts per modality, against the size of the total effect.
            record["mean_abs_nde"][split] = {m: float(abs(out[f"nde_{LETTERS[m]}"]).mean()) for m in MODALITIES}
            record["mean_abs_nde"][split]["te"] = float(abs(out["te"]).mean())
            if split == "test":
                record["margins"] = decision_margins(out, task)
    return record


def remeasure(record: dict, work_dir: Path) -> dict:
    """Recompute a cached run's measurements from its checkpoint (after the measurement set grew)."""
    import torch

    from src.run import distributed

    torch.set_num_threads(1)
    fresh = measure(work_dir / "runs" / record["job"]["key"], distributed.setup("cpu"))
    fresh.pop("epoch")
    return {**record, **fresh}


def run_all(jobs: list[dict], work_dir: Path, n_jobs: int, remeasure_cached: bool = False) -> list[dict]:
    """Run the jobs not already cached, in parallel; return every job's record in plan order."""
    cache = work_dir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    records, todo = {}, []
    for job in jobs:
        path = cache / f"{job['key']}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            if remeasure_cached and (work_dir / "runs" / job["key"] / "best_acc.pt").is_file():
                record = remeasure(record, work_dir)
                path.write_text(json.dumps(record, indent=1))
            records[job["key"]] = dict(record, reused=True)
        else:
            todo.append(job)
    if todo:
        print(f"training {len(todo)} model(s) ({len(jobs) - len(todo)} reused from {cache}), {n_jobs} at a time",
              flush=True)
        # One thread per process, set before any worker imports torch; spawn avoids forking a torch parent.
        os.environ["OMP_NUM_THREADS"] = "1"
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=n_jobs, mp_context=context) as pool:
            futures = {pool.submit(run_job, job, str(work_dir)): job for job in todo}
            for future in concurrent.futures.as_completed(futures):
                job = futures[future]
                try:
                    record = future.result()
                except Exception as err:  # one failed run shouldn't lose the others' hours
                    record = {"job": job, "error": f"{type(err).__name__}: {err}"}
                    print(f"  FAILED {job['key']}: {record['error']}", flush=True)
                else:
                    (cache / f"{job['key']}.json").write_text(json.dumps(record, indent=1))
                    judged_by = "tie" if job["model"] == "causalmer" else "m"
                    print(f"  done {job['key']}: test {record['metric']} {100 * record['test'][judged_by]:.2f} "
                          f"({record['seconds']:.0f}s)", flush=True)
                records[job["key"]] = dict(record, reused=False)
    return [records[job["key"]] for job in jobs]


def robustness_of(causal: dict, baseline: dict, work_dir: str, options: dict) -> dict:
    """The `robustness` command on one CausalMER run with its seed's backbone-alone run as the baseline."""
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("causalmer").setLevel(logging.WARNING)
    from src.commands.robustness import robustness_run

    runs = Path(work_dir) / "runs"
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # its table, once per run, is noise here
        result = robustness_run(runs / causal["job"]["key"], device="cpu", baseline=str(runs / baseline["job"]["key"]),
                                **options)
    keep = ("metric", "predictions", "subset_sizes", "accuracy", "alpha", "missing", "bootstrap")
    return {key: result[key] for key in keep}


def add_robustness(records: list[dict], work_dir: Path, n_jobs: int, options: dict) -> None:
    """Attach `robustness` to every CausalMER record that has its baseline (cached like the runs)."""
    cache = work_dir / "cache"
    ok = [r for r in records if "error" not in r]
    baselines = {(r["job"]["bias_strength"], r["job"]["seed"]): r for r in ok if r["job"]["model"] == "backbone"}
    todo = []
    for record in ok:
        base = baselines.get((record["job"]["bias_strength"], record["job"]["seed"]))
        if record["job"]["model"] != "causalmer" or base is None:
            continue
        path = cache / f"{record['job']['key']}_robustness_{hashlib.sha1(json.dumps(options).encode()).hexdigest()[:8]}.json"
        if path.is_file():
            record["robustness"] = json.loads(path.read_text())
        else:
            todo.append((record, base, path))
    if not todo:
        return
    print(f"robustness of {len(todo)} CausalMER run(s)", flush=True)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=n_jobs, mp_context=context) as pool:
        futures = {pool.submit(robustness_of, record, base, str(work_dir), options): (record, path)
                   for record, base, path in todo}
        for future in concurrent.futures.as_completed(futures):
            record, path = futures[future]
            record["robustness"] = future.result()
            path.write_text(json.dumps(record["robustness"], indent=1))


# ------------------------------------------------------------------------------------------ summary
def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof=1; 0 for a single value) over seeds."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n}


def summarize(setting: dict, records: list[dict]) -> list[dict]:
    """One entry per (strength, fusion, branches): per-seed values and their mean ± std over seeds."""
    ok = [r for r in records if "error" not in r]
    baselines = {(r["job"]["bias_strength"], r["job"]["seed"]): r for r in ok if r["job"]["model"] == "backbone"}
    groups = {}
    for r in ok:
        job = r["job"]
        if job["model"] == "causalmer" and (job["bias_strength"], job["seed"]) in baselines:
            groups.setdefault((job["bias_strength"], job["fusion"], job["branches"]), []).append(r)

    summary = []
    for (strength, fusion, kind), runs in groups.items():
        runs.sort(key=lambda r: r["job"]["seed"])
        base = [baselines[(strength, r["job"]["seed"])] for r in runs]
        per_seed = {
            "seed": [r["job"]["seed"] for r in runs],
            "baseline": [b["test"]["m"] for b in base],
            "causalmer_m": [r["test"]["m"] for r in runs],
            "te": [r["test"]["te"] for r in runs],
            "tie": [r["test"]["tie"] for r in runs],
            "valid_baseline": [b["valid"]["m"] for b in base],
            "valid_te": [r["valid"]["te"] for r in runs],
            "valid_tie": [r["valid"]["tie"] for r in runs],
            "drop_std_baseline": [b["removal"]["m"]["drop_std"] for b in base],
            "drop_std_te": [r["removal"]["te"]["drop_std"] for r in runs],
            "drop_std_tie": [r["removal"]["tie"]["drop_std"] for r in runs],
            "seconds_baseline": [b["seconds"] for b in base],
            "seconds_causalmer": [r["seconds"] for r in runs],
        }
        per_seed["tie_minus_baseline"] = [t - b for t, b in zip(per_seed["tie"], per_seed["baseline"])]
        per_seed["tie_minus_te"] = [t - f for t, f in zip(per_seed["tie"], per_seed["te"])]
        entry = {"bias_modality": setting["bias_modality"], "bias_strength": strength, "fusion": fusion,
                 "branches": kind, "backbone": setting["backbone"], "per_seed": per_seed,
                 "mean": {k: mean_std(v) for k, v in per_seed.items() if k != "seed"},
                 "tie_wins": sum(d > 0 for d in per_seed["tie_minus_baseline"]),
                 "shapley": {
                     "baseline": {m: mean_std([b["shapley"]["m"][m] for b in base]) for m in MODALITIES},
                     "te": {m: mean_std([r["shapley"]["te"][m] for r in runs]) for m in MODALITIES},
                     "tie": {m: mean_std([r["shapley"]["tie"][m] for r in runs]) for m in MODALITIES},
                 },
                 "removal_drops": {
                     "baseline": {k: mean_std([b["removal"]["m"]["removals"][k]["drop"] for b in base])
                                  for k in base[0]["removal"]["m"]["removals"]},
                     "tie": {k: mean_std([r["removal"]["tie"]["removals"][k]["drop"] for r in runs])
                             for k in runs[0]["removal"]["tie"]["removals"]},
                 },
                 "constants_last": {m: mean_std([r["constants_last"][m] for r in runs]) for m in MODALITIES},
                 "branch_acc": {split: {m: mean_std([r["branch_acc"][split][m] for r in runs]) for m in MODALITIES}
                                for split in ("train", "test")},
                 "mean_abs_nde_test": {m: mean_std([r["mean_abs_nde"]["test"][m] for r in runs])
                                       for m in (*MODALITIES, "te")}}
        if all("robustness" in r for r in runs):
            entry["robustness"] = robustness_summary(setting, [r["robustness"] for r in runs])
        if all("margins" in r for r in runs):
            entry["margins_test"] = {k: mean_std([r["margins"][k] for r in runs]) for k in runs[0]["margins"]}
        summary.append(entry)
    return summary


def robustness_summary(setting: dict, results: list[dict]) -> dict:
    """Mean ± std over seeds of the robustness command's figures, and each seed's intervals."""
    shortcut = setting["bias_modality"]
    subsets = ("all", f"conflicting_{shortcut}", f"aligned_{shortcut}")
    predictions = results[0]["predictions"]
    alpha = [r["alpha"] for r in results]
    return {
        "accuracy": {s: {p: mean_std([r["accuracy"][s][p] for r in results if r["accuracy"][s][p] is not None])
                         for p in predictions} for s in subsets if all(s in r["accuracy"] for r in results)},
        "alpha_selected": [a["selected"] for a in alpha],
        "alpha_selected_conflicting": [a["selected_conflicting"].get(f"conflicting_{shortcut}") for a in alpha],
        "alpha_grid": alpha[0]["grid"],
        "alpha_curve": {split: [mean_std([a[split]["all"][i] for a in alpha]) for i in range(len(alpha[0]["grid"]))]
                        for split in ("valid", "test")},
        "missing_rates": results[0]["missing"]["rates"],
        "missing_curve": {p: [mean_std([r["missing"]["curves"][p]["mean"][i] for r in results])
                              for i in range(len(results[0]["missing"]["rates"]))] for p in predictions},
        "auilc": {p: mean_std([r["missing"]["auilc"][p] for r in results]) for p in predictions},
        "intervals": [{name: {s: iv for s, iv in per.items() if s in ("all", f"conflicting_{shortcut}")}
                       for name, per in r["bootstrap"]["intervals"].items()} for r in results],
    }


def pct(stats: dict, signed: bool = False) -> str:
    sign = "+" if signed else ""
    return f"{100 * stats['mean']:{sign}.2f} ± {100 * stats['std']:.2f}"


def num(stats: dict) -> str:
    return f"{stats['mean']:+.3f} ± {stats['std']:.3f}"


def tables(setting: dict, summary: list[dict]) -> str:
    """Markdown tables: headline results, robustness and contributions, and the diagnostics."""
    extra = "".join(f", {t}" for t in setting["overrides"]) + "".join(f", CausalMER {t}" for t in setting.get("causal_overrides", []))
    lines = [f"Setting: {setting['backbone']} {setting['backbone_params']}, shortcut in {setting['bias_modality']}{extra}, "
             f"scale {setting['scale']:g}, {setting['epochs']} epochs, seeds {setting['seeds']}, "
             f"checkpoint {setting['checkpoint']} (valid), test avg_acc in %, mean ± std over seeds", ""]
    lines += ["| strength | fusion | branches | baseline | CausalMER z_m | TE | TIE | TIE − TE | TIE − baseline | TIE wins |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        m = e["mean"]
        lines.append(f"| {e['bias_strength']:g} | {e['fusion']} | {e['branches']} | {pct(m['baseline'])} | "
                     f"{pct(m['causalmer_m'])} | {pct(m['te'])} | {pct(m['tie'])} | {pct(m['tie_minus_te'], True)} | "
                     f"{pct(m['tie_minus_baseline'], True)} | "
                     f"{e['tie_wins']}/{len(e['per_seed']['seed'])} |")
    lines += ["", "Valid (biased) vs test, robustness (std of the six removal drops) and Shapley contributions "
              "(t / a / v, points of avg_acc):", "",
              "| strength | fusion | branches | valid base | valid TIE | drop std base | drop std TIE | "
              "Shapley base | Shapley TIE |", "|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        m = e["mean"]
        shap = {who: " / ".join(f"{100 * e['shapley'][who][mod]['mean']:+.1f}" for mod in MODALITIES)
                for who in ("baseline", "tie")}
        lines.append(f"| {e['bias_strength']:g} | {e['fusion']} | {e['branches']} | {pct(m['valid_baseline'])} | "
                     f"{pct(m['valid_tie'])} | {pct(m['drop_std_baseline'])} | {pct(m['drop_std_tie'])} | "
                     f"{shap['baseline']} | {shap['tie']} |")
    lines += ["", "Diagnostics: constants at the end of training, branch accuracy train → test (%), "
              "mean |NDE_m| on test (vs mean |TE|), seconds per run:", "",
              "| strength | fusion | branches | c_t / c_a / c_v | branch acc t | branch acc a | branch acc v | "
              "mean abs NDE t / a / v (TE) | s base / CausalMER |", "|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        consts = " / ".join(f"{e['constants_last'][m]['mean']:+.3f}" for m in MODALITIES)
        acc = {m: f"{100 * e['branch_acc']['train'][m]['mean']:.1f} → {100 * e['branch_acc']['test'][m]['mean']:.1f}"
               for m in MODALITIES}
        nde = e["mean_abs_nde_test"]
        nde_text = " / ".join(f"{nde[m]['mean']:.3f}" for m in MODALITIES) + f" ({nde['te']['mean']:.3f})"
        lines.append(f"| {e['bias_strength']:g} | {e['fusion']} | {e['branches']} | {consts} | {acc['text']} | "
                     f"{acc['audio']} | {acc['vision']} | {nde_text} | "
                     f"{e['mean']['seconds_baseline']['mean']:.0f} / {e['mean']['seconds_causalmer']['mean']:.0f} |")
    lines += robustness_tables(setting, summary)
    with_margins = [e for e in summary if "margins_test" in e]
    if with_margins:
        lines += ["", "Decision margins on test (present − absent logit per emotion): mean |margin| of TE and of "
                  "each NDE_m, and the share of decisions TIE flips relative to TE:", "",
                  "| strength | fusion | branches | TE margin | NDE_t margin | NDE_a margin | NDE_v margin | TIE≠TE |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in with_margins:
            g = e["margins_test"]
            lines.append(f"| {e['bias_strength']:g} | {e['fusion']} | {e['branches']} | {g['te']['mean']:.3f} | "
                         + " | ".join(f"{g[m]['mean']:.3f}" for m in MODALITIES)
                         + f" | {pct(g['tie_te_flip_rate'])} |")
    return "\n".join(lines)


def robustness_tables(setting: dict, summary: list[dict]) -> list[str]:
    """Where the shortcut stops paying: conflicting subset, chosen α, missing rates, intervals."""
    entries = [e for e in summary if "robustness" in e]
    if not entries:
        return []
    shortcut = setting["bias_modality"]
    names = ("baseline", "m", "te", "tie", "tie_alpha")
    lines = ["", f"Where the shortcut stops paying, test avg_acc in %: all samples, those where a probe on "
             f"{shortcut} alone (fit on train) is wrong (conflicting) and right (aligned); α of TE − α·NDE chosen "
             "on valid (per seed); AUILC over the missing rates (× 100):", "",
             "| strength | fusion | branches | subset | " + " | ".join(names) + " |", "|---" * (len(names) + 4) + "|"]
    for e in entries:
        rob = e["robustness"]
        for subset, values in rob["accuracy"].items():
            lines.append(f"| {e['bias_strength']:g} | {e['fusion']} | {e['branches']} | {subset} | "
                         + " | ".join(pct(values[n]) if n in values and values[n]["n"] else "-" for n in names) + " |")
        lines.append(f"| {e['bias_strength']:g} | {e['fusion']} | {e['branches']} | AUILC | "
                     + " | ".join(pct(rob["auilc"][n]) if n in rob["auilc"] else "-" for n in names) + " |")
        lines.append(f"| {e['bias_strength']:g} | {e['fusion']} | {e['branches']} | α chosen on valid "
                     f"(all / conflicting) | {rob['alpha_selected']} / {rob['alpha_selected_conflicting']} |"
                     + " |" * (len(names) - 1))
    lines += ["", "α curve (TE − α·NDE, mean over seeds, %), valid → test:", "",
              "| strength | fusion | branches | " + " | ".join(f"α={a:g}" for a in entries[0]["robustness"]["alpha_grid"])
              + " |", "|---" * (len(entries[0]["robustness"]["alpha_grid"]) + 3) + "|"]
    for e in entries:
        rob = e["robustness"]
        lines.append(f"| {e['bias_strength']:g} | {e['fusion']} | {e['branches']} | " + " | ".join(
            f"{100 * v['mean']:.1f} → {100 * t['mean']:.1f}" for v, t in zip(rob["alpha_curve"]["valid"],
                                                                          rob["alpha_curve"]["test"])) + " |")
    lines += ["", "Missing-rate curves (each modality of each sample zeroed at rate η, at least one kept; mean "
              "over draws, then mean ± std over seeds, %):", "",
              "| strength | prediction | " + " | ".join(f"η={r:g}" for r in entries[0]["robustness"]["missing_rates"])
              + " |", "|---" * (len(entries[0]["robustness"]["missing_rates"]) + 2) + "|"]
    for e in entries:
        for name, curve in e["robustness"]["missing_curve"].items():
            lines.append(f"| {e['bias_strength']:g} | {name} | " + " | ".join(pct(v) for v in curve) + " |")
    lines += ["", "Paired bootstrap 95% intervals per seed (points; all / conflicting):", "",
              "| strength | seed | difference | all | conflicting |", "|---|---|---|---|---|"]
    for e in entries:
        for seed, intervals in zip(e["per_seed"]["seed"], e["robustness"]["intervals"]):
            for name, per in intervals.items():
                cells = [f"{100 * iv['difference']:+.1f} [{100 * iv['low']:+.1f}, {100 * iv['high']:+.1f}]"
                         if iv["difference"] is not None else "-" for iv in per.values()]
                lines.append(f"| {e['bias_strength']:g} | {seed} | {name} | " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setting = resolve(args)
    if setting["backbone"] == "dmd" and not (REPO / "src" / "models" / "dmd.py").is_file():
        print("error: --backbone dmd needs src/models/dmd.py, which this checkout doesn't have", file=sys.stderr)
        return 2
    temporary = args.quick and not args.work_dir  # a smoke run leaves nothing behind
    if args.work_dir:
        work_dir = Path(args.work_dir)
    elif temporary:
        work_dir = Path(tempfile.mkdtemp(prefix="causalmer_debias_quick_"))
    else:
        work_dir = Path(tempfile.gettempdir()) / "causalmer_debias"
    output = Path(args.output) if args.output else default_output(setting)

    started = time.time()
    machine = machine_info(torch_threads_per_job=1)  # its load average is the start's
    jobs = plan_jobs(setting)
    write_data(work_dir, jobs)
    records = run_all(jobs, work_dir, max(1, args.jobs), args.remeasure)
    add_robustness(records, work_dir, max(1, args.jobs), setting["robustness"])
    summary = summarize(setting, records)
    wall = time.time() - started
    if temporary:
        shutil.rmtree(work_dir, ignore_errors=True)

    report = {"benchmark": "debias", "setting": setting, "command": " ".join(["python", "benchmarks/debias.py",
                                                                                *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine, "wall_time_s": round(wall, 1),
              "compute_s": round(sum(r.get("seconds", 0.0) for r in records), 1),
              "reused_runs": sum(bool(r.get("reused")) for r in records),
              "remeasured": bool(args.remeasure),  # cached runs re-evaluated: wall time is evaluation only
              "failed_runs": [{"key": r["job"]["key"], "error": r["error"]} for r in records if "error" in r],
              "summary": summary, "runs": records}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1))
    print()
    print(tables(setting, summary))
    print(f"\nwall time {wall:.0f}s (training + evaluation of {len(records) - report['reused_runs']} new run(s)); "
          f"wrote {output}")
    return 1 if report["failed_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
