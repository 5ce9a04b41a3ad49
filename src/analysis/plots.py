"""Bar charts of modality contributions and missing-modality drops (PNG, optional matplotlib).

matplotlib is an optional extra: it is imported only when a chart is drawn, and every function returns
None when it is missing so the caller can print ``PLOTS_HINT`` instead of failing. Figures are drawn on
the Agg canvas directly (no pyplot), so nothing here touches a display or global plotting state.

Values may be plain numbers or ``(mean, std)`` pairs from a multi-seed summary; pairs get error bars.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..atomic import replacing
from ..eval.metrics import is_fraction_metric
from ..modalities import MODALITIES, REMOVALS

PLOTS_HINT = "install the plots extra: pip install -e .[plots]"
FIGURE_FORMATS = ("png", "pdf", "svg")  # a figure's format is its file's suffix

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
    return _save(figure, path)


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


# --- training curves ------------------------------------------------------------------------------

def _percent(key: str, value: float) -> float:
    """Accuracies and F1 in percent, as the text tables show them; other metrics unchanged."""
    return 100.0 * value if is_fraction_metric(key) else value


def plot_curves(history: list, path, headline_key: str) -> Path | None:
    """curves.png of a run's per-epoch history: losses (with the training loss's parts), the validation
    headline of each prediction, every learning rate, and the counterfactual constants.

    Returns the PNG path, or None when matplotlib is not installed.
    """
    if not history:
        raise ValueError("nothing to plot: the run has no epochs")
    figure = _new_figure(11.0, 7.5)
    if figure is None:
        return None
    epochs = [entry["epoch"] for entry in history]
    losses, scores, rates, constants = (figure.add_subplot(2, 2, i) for i in range(1, 5))

    losses.plot(epochs, [e["train_loss"] for e in history], marker="o", label="train loss", linewidth=2)
    losses.plot(epochs, [e["valid_loss"] for e in history], marker="o", label="valid loss", linewidth=2)
    for term in history[-1].get("train_terms", {}):
        losses.plot(epochs, [e.get("train_terms", {}).get(term, math.nan) for e in history], linestyle="--",
                    linewidth=1, label=f"train {term}")
    # The KL term is orders of magnitude above the task terms: a log axis shows both.
    if all(v > 0 for line in losses.get_lines() for v in line.get_ydata() if not math.isnan(v)):
        losses.set_yscale("log")
    losses.set_title("loss (train parts dashed)")

    unit = " (%)" if _percent(headline_key, 1.0) == 100.0 else ""
    predictions = list(history[-1].get("valid_scores", {}).get(headline_key, {}))
    for prediction in predictions:
        scores.plot(epochs, [_percent(headline_key, e["valid_scores"][headline_key][prediction]) for e in history],
                    marker="o", label=prediction)
    if not predictions:  # a history written before per-prediction scores were kept
        scores.plot(epochs, [_percent(headline_key, e[f"valid_{headline_key}"]) for e in history], marker="o")
    scores.set_title(f"valid {headline_key}{unit}")

    for group in history[-1].get("lrs", {"lr": None}):
        values = [e["lrs"][group] for e in history] if "lrs" in history[-1] else [e["lr"] for e in history]
        rates.plot(epochs, values, marker="o", label=group)
    rates.set_yscale("log")
    rates.set_title("learning rate")

    if "constants" in history[-1]:
        for name in history[-1]["constants"]:
            constants.plot(epochs, [e["constants"][name] for e in history], marker="o", label=name)
        constants.set_title("counterfactual constants")
    else:
        constants.text(0.5, 0.5, "no causal head (backbone alone)", ha="center", va="center",
                       transform=constants.transAxes)
        constants.set_title("counterfactual constants")

    from matplotlib.ticker import MaxNLocator

    for axes in (losses, scores, rates, constants):
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(frameon=False, fontsize=7)
    figure.tight_layout()
    return _save(figure, path)


def _save(figure, path) -> Path:
    """The figure at `path` in the format its suffix names (png, pdf, svg), through the atomic writer."""
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"a figure is written as {', '.join(FIGURE_FORMATS)}, not {path.name}")
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:
        figure.savefig(tmp, format=fmt)
    return path


# --- confusion matrices ---------------------------------------------------------------------------

def plot_confusion(matrices: dict, path, title: str, class_labels: list, panel_labels: list | None = None,
                   accuracy_name: str = "acc") -> Path | None:
    """Confusion matrices as heatmaps, cells in percent of all samples (so the diagonal sums to the
    accuracy of the text tables), with the counts beneath.

    ``matrices``: ``{prediction: counts}`` with counts (C, C), rows the true class, columns the
    predicted one; or (D, 2, 2) for D binary decisions (IEMOCAP's emotions, named by ``panel_labels``),
    drawn one panel per prediction and decision. Returns the PNG path, or None without matplotlib.
    """
    if not matrices:
        raise ValueError("nothing to plot: no confusion matrices given")
    first = np.asarray(next(iter(matrices.values())))
    per_decision = first.ndim == 3
    # Per-decision matrices: one row per prediction, one column per decision; otherwise side by side.
    rows = len(matrices) if per_decision else 1
    cols = first.shape[0] if per_decision else len(matrices)
    size = 2.3 if per_decision else max(3.8, 0.55 * first.shape[-1] + 1.5)
    figure = _new_figure(size * cols + 0.5, size * rows + 0.6)
    if figure is None:
        return None
    for r, (prediction, counts) in enumerate(matrices.items()):
        counts = np.asarray(counts)
        panels = counts if per_decision else counts[None]
        for c, panel in enumerate(panels):
            index = r * cols + c + 1 if per_decision else r + 1
            axes = figure.add_subplot(rows, cols, index)
            total = max(1, int(panel.sum()))
            percent = 100.0 * panel / total
            axes.imshow(percent, cmap="Blues", vmin=0.0, vmax=max(1e-9, percent.max()))
            for (i, j), value in np.ndenumerate(percent):
                colour = "white" if value > 0.6 * percent.max() else "black"
                axes.text(j, i, f"{value:.1f}\n({int(panel[i, j])})", ha="center", va="center",
                          fontsize=7 if per_decision else 6, color=colour)
            ticks = range(panel.shape[0])
            axes.set_xticks(list(ticks))
            axes.set_yticks(list(ticks))
            axes.set_xticklabels(class_labels, fontsize=7)
            axes.set_yticklabels(class_labels, fontsize=7)
            name = f"{panel_labels[c]}, " if per_decision and panel_labels else ""
            axes.set_title(f"{prediction}: {name}{accuracy_name} {np.trace(percent):.1f}", fontsize=8)
            if c == 0:
                axes.set_ylabel("true", fontsize=8)
            if r == rows - 1 or not per_decision:
                axes.set_xlabel("predicted", fontsize=8)
    figure.suptitle(title + " (% of samples, counts in brackets)", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    return _save(figure, path)


# --- crossmodal attention -------------------------------------------------------------------------

def colour_limits(weights) -> tuple[float, float]:
    """(vmin, vmax) of one attention panel: its own finite range (nan cells ignored), never empty."""
    import numpy as np

    finite = np.asarray(weights, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if not finite.size:
        return 0.0, 1.0
    low, high = float(finite.min()), float(finite.max())
    return low, high if high > low else low + 1e-12


def plot_attention_grid(maps: dict, path, title: str, labels: dict | None = None) -> Path | None:
    """The crossmodal attention maps (query steps x key steps) as a grid of heatmaps, two per row, each
    panel on its own colour scale, nan cells (padded steps) grey.

    ``maps``: ``{encoder name: (T_q, T_k) array}``; ``labels``: a readable title per encoder.
    Returns the PNG path, or None when matplotlib is not installed.
    """
    if not maps:
        raise ValueError("nothing to plot: no attention maps given")
    cols = 2
    rows = math.ceil(len(maps) / cols)
    figure = _new_figure(4.2 * cols, 3.4 * rows + 0.4)
    if figure is None:
        return None
    import matplotlib  # optional dependency, present once _new_figure has a figure

    for index, (name, weights) in enumerate(maps.items()):
        axes = figure.add_subplot(rows, cols, index + 1)
        weights = np.ma.masked_invalid(np.asarray(weights, dtype=np.float64))
        # Each panel on its own colour scale: a near-uniform map has its structure in a narrow band, which
        # a scale shared with a peaked map would flatten to one colour. Masked (padded) cells are grey.
        low, high = colour_limits(weights)
        colours = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
        image = axes.imshow(weights, cmap=colours, aspect="auto", interpolation="nearest", vmin=low, vmax=high)
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
        axes.set_title((labels or {}).get(name, name), fontsize=9)
        axes.set_xlabel("key step (source)", fontsize=8)
        axes.set_ylabel("query step (target)", fontsize=8)
        axes.tick_params(labelsize=7)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return _save(figure, path)


# --- robustness: score against effect scaling α and against the missing rate ------------------------

def plot_lines(x: list, lines: dict, path, title: str, xlabel: str, ylabel: str, marks: dict | None = None) -> Path | None:
    """One line per entry of `lines` ({label: values, or {"mean": [...], "std": [...]}}, std as a band),
    with vertical markers at `marks` ({label: x}). Returns the PNG path, or None without matplotlib."""
    figure = _new_figure(6.5, 4.0)
    if figure is None:
        return None
    axes = figure.add_subplot(1, 1, 1)
    for label, values in lines.items():
        mean = values["mean"] if isinstance(values, dict) else values
        y = [math.nan if v is None else 100.0 * v for v in mean]
        line, = axes.plot(x, y, marker="o", markersize=3, label=label)
        if isinstance(values, dict) and values.get("std"):
            std = [100.0 * s for s in values["std"]]
            axes.fill_between(x, [a - s for a, s in zip(y, std)], [a + s for a, s in zip(y, std)],
                              color=line.get_color(), alpha=0.15)
    for label, value in (marks or {}).items():
        if value is not None:
            axes.axvline(value, color="grey", linestyle="--", linewidth=1)
            axes.text(value, axes.get_ylim()[1], f" {label}", fontsize=7, va="top", color="grey")
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(frameon=False, fontsize=7)
    figure.tight_layout()
    return _save(figure, path)
