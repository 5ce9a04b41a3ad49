"""Bar charts of modality contributions and missing-modality drops (PNG, optional matplotlib).

matplotlib is an optional extra: it is imported only when a chart is drawn, and every function returns
None when it is missing so the caller can print ``PLOTS_HINT`` instead of failing. Figures are drawn on
the Agg canvas directly (no pyplot), so nothing here touches a display or global plotting state.

Values may be plain numbers or ``(mean, std)`` pairs from a multi-seed summary; pairs get error bars.
"""
from __future__ import annotations

import math
from pathlib import Path

from src.analysis.contributions import MODALITIES, REMOVALS
from src.atomic import replacing

PLOTS_HINT = "install the plots extra: pip install -e .[plots]"

REMOVAL_LABELS = {key: "no " + "+".join(sorted(REMOVALS[key], key=MODALITIES.index)) for key in REMOVALS}


def _new_figure(width: float, height: float):
    """A Figure attached to an Agg canvas, or None when matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(figure)
    return figure


def _mean_and_error(value) -> tuple[float, float | None]:
    if isinstance(value, (tuple, list)):
        mean, std = value
        return float(mean), float(std)
    return float(value), None


def _ordered_categories(runs: dict, canonical) -> list:
    """Categories present in any run: the canonical ones first in their order, then any others as met."""
    seen = [c for c in canonical if any(c in values for values in runs.values())]
    for values in runs.values():
        seen.extend(c for c in values if c not in seen)
    return seen


def _grouped_bars(runs: dict, categories: list, tick_labels: list, path, title: str, ylabel: str,
                  legend_labels: list | None = None):
    if not runs:
        raise ValueError("nothing to plot: no runs given")
    figure = _new_figure(max(5.0, 1.1 * len(categories) + 2.5), 4.0)
    if figure is None:
        return None
    axes = figure.add_subplot(1, 1, 1)
    labels = list(runs)
    group_width = 0.8
    bar_width = group_width / len(labels)
    positions = list(range(len(categories)))
    for index, label in enumerate(labels):
        offsets = [p - group_width / 2 + (index + 0.5) * bar_width for p in positions]
        means, errors = [], []
        for category in categories:
            if category in runs[label]:
                mean, error = _mean_and_error(runs[label][category])
            else:
                mean, error = math.nan, None
            means.append(mean)
            errors.append(error)
        has_errors = any(e is not None for e in errors)
        bars = axes.bar(offsets, means, bar_width * 0.95,
                        yerr=[e if e is not None else 0.0 for e in errors] if has_errors else None,
                        capsize=3 if has_errors else 0,
                        label=legend_labels[index] if legend_labels else label)
        # Numbers on the bars: the chart is read for its values, not just its shape.
        axes.bar_label(bars, labels=["" if math.isnan(m) else f"{m:.3g}" for m in means], fontsize=7, padding=2)
    axes.axhline(0.0, color="black", linewidth=0.8)
    axes.set_xticks(positions)
    axes.set_xticklabels(tick_labels)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.margins(y=0.15)
    axes.grid(axis="y", alpha=0.3)
    axes.set_axisbelow(True)
    if len(labels) > 1 or legend_labels:
        axes.legend(frameon=False, fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        figure.savefig(tmp, format="png")
    return path


def plot_contributions(runs: dict, path, title: str = "Modality contributions",
                       ylabel: str = "contribution") -> Path | None:
    """Grouped bars of each modality's contribution, one bar colour per run label.

    ``runs``: ``{label: {modality: value}}``, e.g. ``{"mult": {...}, "causalmer": {...}}`` with Shapley
    values or NDE shares; a value may be a ``(mean, std)`` pair. Returns the PNG path, or None when
    matplotlib is not installed.
    """
    categories = _ordered_categories(runs, MODALITIES)
    return _grouped_bars(runs, categories, list(categories), path, title, ylabel)


def plot_removal_drops(runs: dict, path, title: str = "Score drop when modalities are removed",
                       ylabel: str = "drop from full-input score") -> Path | None:
    """Grouped bars of the drop per removal (``t``, ``a``, ``v``, ``ta``, ``tv``, ``av``), per run label.

    The legend shows each run's population standard deviation of its drops, the robustness figure the
    bars illustrate. Returns the PNG path, or None when matplotlib is not installed.
    """
    categories = _ordered_categories(runs, REMOVALS)
    tick_labels = [REMOVAL_LABELS.get(c, str(c)) for c in categories]
    legend_labels = []
    for label, drops in runs.items():
        means = [_mean_and_error(v)[0] for v in drops.values()]
        if means:
            centre = sum(means) / len(means)
            spread = math.sqrt(sum((m - centre) ** 2 for m in means) / len(means))
            legend_labels.append(f"{label} (drop std {spread:.3g})")
        else:
            legend_labels.append(str(label))
    return _grouped_bars(runs, categories, tick_labels, path, title, ylabel, legend_labels)
