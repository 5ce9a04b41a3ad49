"""Multi-seed summaries: mean ± standard deviation of every metric over groups of runs.

A run is a directory holding a ``metrics.json`` of nested dicts that end in numbers, for example
``{"best_loss": {"test": {"tie": {"avg_acc": 0.83, ...}, "te": {...}, "m": {...}}}, "best_acc": {...}}``.
The structure is read generically: nested keys are joined with ``/`` (``best_loss/test/tie/avg_acc``)
and leaves that are not numbers (strings, lists, null, booleans) are ignored, so new sections in
``metrics.json`` show up in the summary without changes here.

A run with a robustness result (``robustness/robustness.json``, the robustness command's) adds its figures
as ``robustness/<subset>/<prediction>/<metric>``, ``robustness/auilc/<prediction>``,
``robustness/alpha_selected`` and ``robustness/<subset>/<difference>/<metric>_difference``; over seeds a
group also gets a paired t-test of TIE against TE (and TE − α·NDE against TE, TIE against the baseline)
per subset: ``robustness/<subset>/<difference>/paired_t`` and ``paired_p``.

Groups are typically the baseline (the backbone trained alone, e.g. ``mult``) and ``causalmer``, each a
list of runs that differ only in seed.
"""
from __future__ import annotations

import csv
import fnmatch
import json
import math
from pathlib import Path

import numpy as np
import yaml
from ..eval.stats import paired_t_test

from ..atomic import replacing
from ..errors import UserError
from ..trees import flatten
from ..eval.metrics import format_value, is_fraction_metric

METRICS_FILE = "metrics.json"
ROBUSTNESS_FILE = Path("robustness") / "robustness.json"
CONFIG_FILE = "config.yaml"
CSV_FIELDS = ("group", "metric", "unit", "n", "mean", "std")
# Sections of metrics.json that say where the numbers came from; they are not metrics.
PROVENANCE_KEYS = ("data",)
# What a run is: runs averaged together must agree on all of these (they may differ in seed only).
IDENTITY_KEYS = ("dataset", "data.task", "data.aligned", "model.name", "model.backbone")


def flatten_metrics(tree: dict) -> dict[str, float]:
    """Nested dicts to ``{"a/b/metric": value}`` for every numeric leaf, in the file's order."""
    metrics = {key: value for key, value in tree.items() if key not in PROVENANCE_KEYS}
    # bool is an int subclass, but a flag is not a metric.
    return {name: float(value) for name, value in flatten(metrics, sep="/").items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def read_json(path: Path):
    """A result file of a run (metrics.json, robustness.json), or a message naming the file."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None


def robustness_metrics(run_dir: Path) -> dict[str, float]:
    """The figures of a run's robustness result (module docstring), or {} when it has none."""
    path = Path(run_dir) / ROBUSTNESS_FILE
    if not path.is_file():
        return {}
    result = read_json(path)
    try:
        metric = result["metric"]
        flat = {f"robustness/{subset}/{prediction}/{metric}": value
                for subset, per in result["accuracy"].items() for prediction, value in per.items() if value is not None}
        flat.update({f"robustness/auilc/{p}": v for p, v in result["missing"]["auilc"].items() if v is not None})
        if result.get("alpha") and result["alpha"]["selected"] is not None:
            flat["robustness/alpha_selected"] = result["alpha"]["selected"]
        for name, per in result["bootstrap"]["intervals"].items():
            flat.update({f"robustness/{subset}/{name}/{metric}_difference": iv["difference"]
                         for subset, iv in per.items() if iv["difference"] is not None})
        return {key: float(value) for key, value in flat.items()}
    except (KeyError, TypeError, AttributeError, ValueError) as error:
        raise UserError(f"{path} is not a robustness result as `robustness` writes it (missing or malformed: "
                        f"{error}); run `main.py robustness` on this run again") from error


def paired_seed_tests(run_dirs: list) -> dict[str, tuple[float, int]]:
    """Paired t-tests over seeds (one pair per run) of each bootstrapped difference, per subset:
    {metric: (value, number of pairs)}."""
    per_run = [robustness_metrics(run_dir) for run_dir in run_dirs]
    tests = {}
    for key in per_run[0] if per_run else {}:
        parts = key.split("/")
        if len(parts) != 4 or not parts[3].endswith("_difference"):
            continue
        first, second = parts[2].split("-", 1)
        metric = parts[3][:-len("_difference")]
        pairs = [(r.get(f"robustness/{parts[1]}/{first}/{metric}"), r.get(f"robustness/{parts[1]}/{second}/{metric}"))
                 for r in per_run]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if len(pairs) < 2 or all(a == b for a, b in pairs):
            continue  # no test of one seed, nor of differences that are all zero
        result = paired_t_test([b for _, b in pairs], [a for a, _ in pairs])  # the t of first - second
        tests[f"robustness/{parts[1]}/{parts[2]}/paired_t"] = (result["t"], len(pairs))
        tests[f"robustness/{parts[1]}/{parts[2]}/paired_p"] = (result["p"], len(pairs))
    return tests


def load_run_metrics(run_dir: Path) -> dict[str, float]:
    """The flattened metrics of one run directory (and its robustness figures, module docstring)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: is {run_dir} a finished run directory?")
    tree = read_json(path)
    if not isinstance(tree, dict):
        raise UserError(f"{path} should hold a JSON object of metrics, found {type(tree).__name__}")
    return {**flatten_metrics(tree), **robustness_metrics(run_dir)}


def collect_runs(root, pattern: str = "*") -> list[Path]:
    """Run directories under ``root`` whose path matches the glob ``pattern`` and that hold a metrics.json.

    ``pattern`` is relative to ``root`` and may span levels (``"mult_seed*"``, ``"*/causalmer_*"``,
    ``"**/seed*"``). Sorted, so seeds come out in a stable order.
    """
    root = Path(root)
    return sorted(path for path in root.glob(pattern) if path.is_dir() and (path / METRICS_FILE).is_file())


def read_run_config(run_dir: Path) -> dict | None:
    """A run's config.yaml as flat dotted keys, or None for a run directory without one."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return None
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} should hold a run config (a mapping), found {type(cfg).__name__}")
    return flatten(cfg)


def check_groups(groups: dict[str, list]) -> list[str]:
    """Refuse a group whose runs are not the same experiment; return warnings for what may still mislead.

    A group is averaged, so its runs must agree on IDENTITY_KEYS (dataset, task, alignment, model,
    backbone); any other config difference inside a group is a warning naming it, as is a side-by-side
    of groups on different datasets or tasks. Runs without a config.yaml cannot be checked."""
    warnings, firsts = [], {}
    for group, run_dirs in groups.items():
        reference = None
        for run_dir in run_dirs:
            cfg = read_run_config(run_dir)
            if cfg is None:
                warnings.append(f"{run_dir} has no {CONFIG_FILE}: group {group!r} cannot be checked for a mixture")
                continue
            if reference is None:
                reference, firsts[group] = (run_dir, cfg), (run_dir, cfg)
                continue
            first_dir, first_cfg = reference
            for key in IDENTITY_KEYS:
                if cfg.get(key) != first_cfg.get(key):
                    raise UserError(f"group {group!r} mixes runs of different experiments: {key} is "
                                    f"{first_cfg.get(key)!r} in {first_dir} but {cfg.get(key)!r} in {run_dir}; "
                                    "a group's runs should differ in seed only")
            other = next((k for k in sorted(set(cfg) | set(first_cfg)) if cfg.get(k) != first_cfg.get(k)), None)
            if other is not None:
                warnings.append(f"group {group!r}: {other} is {first_cfg.get(other)!r} in {first_dir} but "
                                f"{cfg.get(other)!r} in {run_dir}")
    seen = {}
    for group, (run_dir, cfg) in firsts.items():
        what = (cfg.get("dataset"), cfg.get("data.task"))
        for other_group, (other_dir, other_what) in seen.items():
            if what != other_what:
                warnings.append(f"groups {other_group!r} and {group!r} are on different data: {other_what[0]} "
                                f"({other_what[1]}) vs {what[0]} ({what[1]}); their differences mean little")
        seen[group] = (run_dir, what)
    return warnings


def summarize(groups: dict[str, list]) -> list[dict]:
    """Mean and standard deviation of every metric, per group of runs.

    ``groups`` maps a group name to its run directories. Returns one row per (group, metric):
    ``{"group", "metric", "n", "mean", "std"}`` in the unit metrics.json stores (fractions). ``std`` is the
    sample standard deviation (ddof=1), the usual error bar across seeds, and nan when a single run has the
    metric (one seed says nothing about the spread). ``n`` counts the runs that
    report the metric with a finite value (a run without it, or with nan, does not count), so a summary
    never silently averages over fewer seeds than it shows. Metrics keep the order in which they first
    appear.
    """
    rows: list[dict] = []
    for group, run_dirs in groups.items():
        run_dirs = list(run_dirs)
        if not run_dirs:
            raise UserError(f"group {group!r} has no runs: check the run directory and pattern")
        values: dict[str, list[float]] = {}
        for run_dir in run_dirs:
            for metric, value in load_run_metrics(run_dir).items():
                bucket = values.setdefault(metric, [])
                if math.isfinite(value):
                    bucket.append(value)
        for metric, samples in values.items():
            n = len(samples)
            rows.append({
                "group": group,
                "metric": metric,
                "n": n,
                "mean": float(np.mean(samples)) if n else float("nan"),
                "std": float(np.std(samples, ddof=1)) if n > 1 else float("nan"),
            })
        # A test over the seeds, not a mean: one value per group, n the number of paired seeds.
        for metric, (value, n) in paired_seed_tests(run_dirs).items():
            rows.append({"group": group, "metric": metric, "n": n, "mean": value, "std": float("nan")})
    return rows


def write_csv(rows: list[dict], path) -> Path:
    """Write summary rows as CSV (columns group, metric, unit, n, mean, std; full precision), accuracies and
    F1 in percent as every table shows them (unit "%"), other metrics as they are (unit "-")."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            scale = 100.0 if is_fraction_metric(row["metric"]) else 1.0
            writer.writerow({**{field: row[field] for field in ("group", "metric", "n")},
                             "unit": "%" if scale == 100.0 else "-",
                             "mean": scale * row["mean"], "std": "" if math.isnan(row["std"]) else scale * row["std"]})
    return path


def _mean_std_cell(row: dict | None) -> str:
    if row is None or row["n"] == 0:
        return "-"
    spread = "—" if math.isnan(row["std"]) else format_value(row["metric"], row["std"])
    return f"{format_value(row['metric'], row['mean'])} ± {spread} (n={row['n']})"


def format_summary(rows: list[dict], groups, keys=None) -> str:
    """A fixed-width table with the groups side by side: ``mean ± std (n=…)`` per metric (``--full``).

    ``groups``: the group names in column order (a dict's keys work). ``keys``: metric names or glob
    patterns (``"best_loss/test/tie/*"``) selecting rows; all metrics when omitted. Accuracies and F1
    are percentages. There is no difference column: the same path means different things in different
    groups (a backbone run's ``m`` is the whole model, CausalMER's ``m`` one of its branches; the losses
    are of different objectives); the paper table (src/analysis/table.py) sets the right rows apart.
    """
    groups = list(groups)
    by_key = {(row["group"], row["metric"]): row for row in rows}
    metrics: list[str] = []
    for row in rows:
        if row["group"] in groups and row["metric"] not in metrics:
            metrics.append(row["metric"])
    if keys is not None:
        patterns = [keys] if isinstance(keys, str) else list(keys)
        metrics = [m for m in metrics if any(fnmatch.fnmatchcase(m, pattern) for pattern in patterns)]
    if not groups or not metrics:
        return "(no metrics to summarise)"

    header = ["metric", *groups]
    body = [[metric, *(_mean_std_cell(by_key.get((group, metric))) for group in groups)] for metric in metrics]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join([row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:]))]).rstrip()
             for row in [header, *body]]
    lines.insert(1, "  ".join("-" * width for width in widths))
    note = "accuracies and F1 in %; " if any(is_fraction_metric(m) for m in metrics) else ""
    return "\n".join(lines + [f"({note}std: sample, ddof=1, — with one run)"])
