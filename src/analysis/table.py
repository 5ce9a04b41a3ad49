"""The table a paper prints: one row per predictor, the dataset's headline metrics as columns.

    predictor                         n   avg_acc (%)   avg_f1 (%)
    mult alone                        3   80.1 ± 0.4    79.9 ± 0.5
    causalmer: m (its backbone)       3   ...
    causalmer: te (fused)             3
    causalmer: tie (debiased)         3
    causalmer: tie_alpha (α = 0.5)    3   (where <run>/robustness/robustness.json exists)
    tie − mult alone                  3   +1.2 ± 0.3 (p = 0.04)
    95% interval, paired bootstrap        [+0.4, +2.0]   (where <run>/predictions_<split>.npz exist)

Cells are mean ± sample std (ddof = 1) over the group's seeds; with one seed the std is undefined and
shown as "—". Accuracies and F1 are in percent, MAE and correlation in their own units. The difference
row pairs the seeds the two groups share (seed k with seed k) and tests them with a paired t-test
(src/eval/stats.py); the interval resamples test samples, the same ones for both predictors. Losses
never appear: the runs minimise different objectives. The numbers come from each run's metrics.json,
test split, checkpoint of the best validation headline score (selected on validation only).
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..eval.metrics import PAPER_METRICS, headline, headline_hits, is_fraction_metric
from ..eval.stats import paired_bootstrap, paired_t_test
from .summary import METRICS_FILE, ROBUSTNESS_FILE, read_json, read_run_config

FORMATS = ("markdown", "latex", "csv")
EXTENSIONS = {"markdown": "md", "latex": "tex", "csv": "csv"}
PREDICTION_LABELS = {"m": "m (its backbone)", "te": "te (fused)", "tie": "tie (debiased)"}
CAUSAL_PREDICTIONS = ("m", "te", "tie")
ALL_SAMPLES = "all"  # the subset of robustness.json's accuracy that is the whole split
NO_STD = "—"


@dataclass
class Cell:
    """One number of the table in its display unit: a mean over seeds, or a paired difference."""
    mean: float
    std: float = math.nan
    n: int = 0
    p: float | None = None            # a difference's paired t-test
    interval: tuple | None = None     # a difference's bootstrap interval (low, high)


@dataclass
class PaperTable:
    caption: str
    metrics: list
    rows: list = field(default_factory=list)     # (label, n, {metric: Cell})
    notes: list = field(default_factory=list)


def unit_of(metric: str) -> str:
    return "%" if is_fraction_metric(metric) else ""


def header_of(metric: str) -> str:
    return f"{metric} ({unit_of(metric)})" if unit_of(metric) else metric


def in_display_unit(metric: str, value: float) -> float:
    return 100.0 * value if is_fraction_metric(metric) else value


def run_predictions(run_dir: Path, checkpoint: str, split: str) -> dict:
    """{prediction: {metric: value}} of a run's metrics.json (fractions as stored)."""
    path = Path(run_dir) / METRICS_FILE
    tree = read_json(path)
    try:
        return tree[checkpoint][split]["predictions"]
    except (KeyError, TypeError):
        raise UserError(f"{path} has no {checkpoint}/{split}/predictions: is it a finished training run?") from None


def tie_alpha(run_dir: Path) -> tuple[float, float] | None:
    """(headline score of TE − α·NDE on the whole split, the α chosen) from <run>/robustness/robustness.json,
    or None where the run has none."""
    path = Path(run_dir) / ROBUSTNESS_FILE
    if not path.is_file():
        return None
    saved = read_json(path)
    try:
        return float(saved["accuracy"][ALL_SAMPLES]["tie_alpha"]), float(saved["alpha"]["selected"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{path} has no accuracy/{ALL_SAMPLES}/tie_alpha and alpha/selected: "
                        "was it written by this version's robustness command?") from None


def load_hits(run_dir: Path, split: str, prediction: str, task: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(sample indices, per-sample headline hits) of one prediction from <run>/predictions_<split>.npz,
    or None where the file does not exist."""
    path = Path(run_dir) / f"predictions_{split}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as saved:
            index, target = saved["index"], saved["target"]
            logits = saved[f"logits_{prediction}"]
            score = saved["score"] if "score" in saved.files else None
    except (OSError, ValueError, KeyError) as error:
        raise UserError(f"cannot read {path} (keys index, target, logits_{prediction}): {error}") from None
    order = np.argsort(index, kind="stable")
    hits = headline_hits(logits, target, task, score)
    return index[order], hits[order]


def _mean_cell(metric: str, values: list) -> Cell:
    values = [in_display_unit(metric, v) for v in values if v is not None and math.isfinite(v)]
    n = len(values)
    return Cell(mean=float(np.mean(values)) if n else math.nan,
                std=float(np.std(values, ddof=1)) if n > 1 else math.nan, n=n)


def group_kind(label: str, run_dirs: list) -> tuple[str, dict]:
    """('causalmer' or 'backbone', the first run's flat config); summary.check_groups has made sure the
    runs of a group agree on it."""
    cfg = read_run_config(run_dirs[0]) or {}
    return ("causalmer" if cfg.get("model.name") == "causalmer" else "backbone"), cfg


def group_tasks(groups: dict) -> set:
    """The tasks of the groups' first runs (None for a run without config.yaml): one task, one table."""
    return {group_kind(label, dirs)[1].get("data.task") for label, dirs in groups.items()}


def build_table(groups: dict, checkpoint: str = "best_acc", split: str = "test") -> PaperTable:
    """The paper table of groups of runs ({label: [run dirs]}, a run's directory name being its seed)."""
    kinds = {label: group_kind(label, dirs) for label, dirs in groups.items()}
    tasks = group_tasks(groups)
    if len(tasks) != 1 or None in tasks:
        raise UserError("the paper table puts runs of one task side by side; these groups are on tasks "
                        f"{sorted(map(str, tasks))} (a run without config.yaml has none): summarize them apart")
    task = tasks.pop()
    columns = list(PAPER_METRICS[task])
    key, _ = headline(task)
    dataset = next(iter(kinds.values()))[1].get("dataset", "")
    table = PaperTable(caption=f"{dataset} {split} split, checkpoint of the best validation {key}; "
                       "mean ± sample std over seeds (— with one seed); accuracies and F1 in %", metrics=columns)
    # {label: {prediction: {seed: {metric: value}}}}
    values = {label: {} for label in groups}
    for label, run_dirs in groups.items():
        for run_dir in run_dirs:
            seed = Path(run_dir).name
            for prediction, scores in run_predictions(run_dir, checkpoint, split).items():
                values[label].setdefault(prediction, {})[seed] = scores
            chosen = tie_alpha(run_dir)
            if chosen is not None:
                values[label].setdefault("tie_alpha", {})[seed] = {key: chosen[0], "alpha": chosen[1]}

    def add_row(text: str, per_seed: dict):
        cells = {m: _mean_cell(m, [s.get(m) for s in per_seed.values()]) for m in columns}
        table.rows.append((text, max((c.n for c in cells.values()), default=0), cells))

    baselines = [label for label, (kind, _) in kinds.items() if kind == "backbone"]
    causal = [label for label, (kind, _) in kinds.items() if kind == "causalmer"]
    for label in baselines:
        add_row(f"{label} (backbone alone)", values[label].get("m", {}))
    for label in causal:
        for prediction in CAUSAL_PREDICTIONS:
            if prediction in values[label]:
                add_row(f"{label}: {PREDICTION_LABELS[prediction]}", values[label][prediction])
        if "tie_alpha" in values[label]:
            alphas = sorted({s["alpha"] for s in values[label]["tie_alpha"].values()})
            add_row(f"{label}: tie_alpha (α = {', '.join(f'{a:g}' for a in alphas)}, chosen on valid)",
                    values[label]["tie_alpha"])
            table.notes.append(f"tie_alpha (TE − α·NDE, α chosen on the validation split) reports {key} only.")
    if len(baselines) == 1:
        for label in causal:
            add_difference(table, groups, values, baselines[0], label, columns, key, task, split)
    elif baselines and causal:
        table.notes.append("no difference row: it needs exactly one backbone-alone group, here "
                           f"{', '.join(baselines)}")
    return table


def add_difference(table: PaperTable, groups: dict, values: dict, baseline: str, causal: str, columns: list,
                   key: str, task: str, split: str) -> None:
    """The row `tie − backbone alone` over the seeds both groups have, and its bootstrap interval."""
    alone, tie = values[baseline].get("m", {}), values[causal].get("tie", {})
    seeds = [seed for seed in tie if seed in alone]
    if not seeds:
        table.notes.append(f"no difference row: {causal} and {baseline} have no seed in common")
        return
    cells = {}
    for metric in columns:
        pairs = [(alone[s].get(metric), tie[s].get(metric)) for s in seeds]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
        test = paired_t_test([in_display_unit(metric, a) for a, _ in pairs],
                             [in_display_unit(metric, b) for _, b in pairs])
        cells[metric] = Cell(mean=test["mean"], std=test["std"], n=test["n"], p=test["p"])
    interval = bootstrap_interval(groups, baseline, causal, seeds, task, split)
    if interval is not None:
        cells[key].interval = (100.0 * interval["low"], 100.0 * interval["high"])
        table.notes.append(f"interval: {100 * interval['confidence']:.0f}% paired bootstrap over the {split} samples "
                           f"({interval['resamples']} resamples, {key}, mean over the seeds' differences).")
    table.rows.append((f"tie − {baseline} alone", len(seeds), cells))
    table.notes.append(f"tie − {baseline} alone: mean ± std of the per-seed differences (seed k with seed k); "
                       "p: two-sided paired t-test over those seeds (none with one seed).")


def bootstrap_interval(groups: dict, baseline: str, causal: str, seeds: list, task: str, split: str) -> dict | None:
    """The paired bootstrap of tie − backbone alone where every paired seed has its predictions file."""
    by_seed = {label: {Path(d).name: Path(d) for d in groups[label]} for label in (baseline, causal)}
    first, second = [], []
    for seed in seeds:
        alone = load_hits(by_seed[baseline][seed], split, "m", task)
        tie = load_hits(by_seed[causal][seed], split, "tie", task)
        if alone is None or tie is None:
            return None
        if not np.array_equal(alone[0], tie[0]):
            raise UserError(f"predictions_{split}.npz of {by_seed[baseline][seed]} and {by_seed[causal][seed]} "
                            "hold different samples: were they evaluated on the same data?")
        first.append(alone[1])
        second.append(tie[1])
    if len({len(h) for h in first}) != 1:
        raise UserError(f"the predictions_{split}.npz files of {baseline} and {causal} differ in their samples "
                        "from seed to seed: were all seeds evaluated on the same data?")
    return paired_bootstrap(np.stack(first), np.stack(second))


# ----------------------------------------------------------------------------------------------- rendering
def _precision(metric: str) -> int:
    return 1 if unit_of(metric) else 3


def format_cell(metric: str, cell: Cell, difference: bool = False) -> str:
    if cell.n == 0:
        return ""
    digits = _precision(metric)
    sign = "+" if difference else ""
    text = f"{cell.mean:{sign}.{digits}f}"
    text += f" ± {cell.std:.{digits}f}" if not math.isnan(cell.std) else f" ± {NO_STD}"
    if difference:
        text += f" (p = {cell.p:.3g})" if cell.p is not None and not math.isnan(cell.p) else " (no test)"
        if cell.interval is not None:
            text += f" [{cell.interval[0]:+.{digits}f}, {cell.interval[1]:+.{digits}f}]"
    return text


def _text_rows(table: PaperTable) -> list[list[str]]:
    rows = []
    for label, n, cells in table.rows:
        difference = label.startswith("tie − ")
        rows.append([label, str(n), *(format_cell(m, cells[m], difference) for m in table.metrics)])
    return rows


def render(table: PaperTable, fmt: str = "markdown") -> str:
    """The table as markdown (the console's), LaTeX (a tabular inside a table with its caption) or CSV
    (long format: one line per row and metric, numbers unformatted, the unit in its own column)."""
    header = ["predictor", "n", *map(header_of, table.metrics)]
    if fmt == "markdown":
        lines = [f"**{table.caption}**", "", "| " + " | ".join(header) + " |",
                 "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in _text_rows(table)]
        return "\n".join(lines + [""] + [f"- {note}" for note in dict.fromkeys(table.notes)])
    if fmt == "latex":
        def tex(text: str) -> str:
            for plain, escaped in (("%", r"\%"), ("_", r"\_"), ("±", r"$\pm$"), ("—", "---"), ("−", "$-$"),
                                   ("α", r"$\alpha$"), ("&", r"\&")):
                text = text.replace(plain, escaped)
            return text
        lines = [r"\begin{table}[t]", r"\centering", r"\begin{tabular}{l" + "r" * (len(header) - 1) + "}",
                 r"\toprule", " & ".join(map(tex, header)) + r" \\", r"\midrule"]
        lines += [" & ".join(map(tex, row)) + r" \\" for row in _text_rows(table)]
        notes = " ".join(dict.fromkeys(table.notes))
        lines += [r"\bottomrule", r"\end{tabular}", r"\caption{" + tex(f"{table.caption}. {notes}".strip()) + "}",
                  r"\end{table}"]
        return "\n".join(lines)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["predictor", "n", "metric", "unit", "mean", "std", "p", "interval_low", "interval_high"])
        for label, n, cells in table.rows:
            for metric in table.metrics:
                cell = cells[metric]
                if cell.n == 0:
                    continue
                low, high = cell.interval if cell.interval else ("", "")
                writer.writerow([label, cell.n, metric, unit_of(metric) or "-", cell.mean,
                                 "" if math.isnan(cell.std) else cell.std,
                                 "" if cell.p is None or math.isnan(cell.p) else cell.p, low, high])
        return buffer.getvalue()
    raise UserError(f"--format {fmt!r} is unknown; use one of {', '.join(FORMATS)}")
