"""report.md: one page per `analyze` that reads in a browser or a pull request.

It gathers what the run directories already hold — the test results of metrics.json, every
eval_*.json and robustness_*.json, the robustness command's robustness*/robustness.md, the modality
analysis just computed — as markdown tables, and
links every picture (curves.png, confusion_*.png, attention_*.png, the analysis charts) by a path
relative to the report, so the directory can be moved or committed as it is.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..eval import metrics
from ..atomic import write_bytes, write_text

LABELS = {"tie": "tie (debiased)", "te": "te (fused)", "m": "m (backbone)"}
# What the numbers of analysis.json (and metrics.json, eval_*.json) are: stored as fractions, shown in %.
UNITS_NOTE = ("scores, Shapley contributions and drops are stored as fractions of the metric (0.1 = 10 points); "
              "tables, charts and the console show them in percent / percentage points")
TITLES = {"best_loss": "best validation loss", "best_acc": "best validation score"}


def markdown_table(predictions: dict) -> list[str]:
    """The metrics of each prediction side by side, formatted as in the text tables."""
    columns = list(predictions)
    rows = []
    for values in predictions.values():
        rows.extend(key for key in values if key not in rows)
    lines = ["| metric | " + " | ".join(LABELS.get(c, c) for c in columns) + " |",
             "|---" * (len(columns) + 1) + "|"]
    for key in rows:
        cells = [metrics.format_value(key, predictions[c].get(key)) for c in columns]
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    return lines


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _link(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def _image(path: Path, base: Path, caption: str) -> list[str]:
    """A picture inline (png, svg), or only linked where a browser does not show it inline (pdf)."""
    link = f"**{caption}** ([{path.name}]({_link(path, base)}))"
    if path.suffix.lower() == ".pdf":
        return [link, ""]
    return [link, "", f"![{caption}]({_link(path, base)})", ""]


def gathered(path: Path, base: Path, prefix: str) -> Path:
    """`path` copied into the report's folder as `<prefix>_<name>` (unless it is there already), so that
    the folder holds every picture its report shows."""
    if path.parent.resolve() == base.resolve():
        return path
    copy = base / f"{prefix}_{path.name}"
    write_bytes(copy, path.read_bytes())
    return copy


def run_section(run_dir: Path, label: str, analysis: dict | None, base: Path, gather: bool = False) -> list[str]:
    lines = [f"## {label}", ""]
    results = _read_json(run_dir / "metrics.json")
    if results:
        history = results.get("history", [])
        lines += [f"{len(history)} epochs trained. Accuracies and F1 in %.", ""]
        for which in ("best_loss", "best_acc"):
            if which in results:
                entry = results[which]
                lines += [f"### Test split, checkpoint of the {TITLES[which]} (epoch {entry['epoch']})", ""]
                lines += markdown_table(entry["test"]["predictions"]) + [""]
    for path in sorted(run_dir.glob("eval_*.json")):
        saved = _read_json(path)
        if saved and "predictions" in saved:
            lines += [f"### Evaluation `{path.stem}`", ""] + markdown_table(saved["predictions"]) + [""]
    for path in sorted(run_dir.glob("robustness_*.json")):
        saved = _read_json(path)
        if saved and "summary" in saved:
            names = list(saved["summary"])
            summary = saved["summary"]
            rows = [["none"] + sum(([f"{100 * summary[n]['full_score']:.2f}", ""] for n in names), [])]
            for removal in saved["removals"]:
                rows.append([removal] + sum(([f"{100 * summary[n]['removals'][removal]['score']:.2f}",
                                              f"{100 * summary[n]['removals'][removal]['drop']:.2f}"] for n in names), []))
            rows.append(["drop std"] + sum((["", f"{100 * summary[n]['drop_std']:.2f}"] for n in names), []))
            lines += [f"### Missing-modality test `{path.stem}` ({saved['metric']}, %)", "",
                      "| removed | " + " | ".join(f"{n} score | {n} drop" for n in names) + " |",
                      "|---" * (2 * len(names) + 1) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in rows] + [""]
    for folder in sorted(run_dir.glob("robustness*/")):
        lines += robustness_section(folder, base)
    if analysis:
        lines += analysis_section(analysis)
    pictures = [(run_dir / "curves.png", "Training curves")]
    pictures += [(p, f"Confusion matrices {p.stem[len('confusion_'):]}") for p in sorted(run_dir.glob("confusion_*.png"))]
    attention = sorted(p for p in run_dir.glob("attention_*") if p.suffix in (".png", ".pdf", ".svg"))
    # Attention figures analyze wrote elsewhere (--out) for this run.
    written = (analysis or {}).get("attention") or {}
    if written.get("figure") and Path(written["figure"]) not in attention:
        attention.append(Path(written["figure"]))
    pictures += [(p, f"Crossmodal attention {p.stem.split('attention_', 1)[-1]}") for p in attention]
    for path, caption in pictures:
        if path.is_file():
            lines += _image(gathered(path, base, label.replace("/", "_")) if gather else path, base, caption)
    return lines


def robustness_section(folder: Path, base: Path) -> list[str]:
    """The robustness command's page of a run (its robustness.md, one level down), pictures relinked."""
    page = folder / "robustness.md"
    if not page.is_file():
        return []
    lines = [f"### Robustness `{folder.name}`", ""]
    for line in page.read_text().splitlines()[1:]:  # its own title gives way to the heading above
        if line.startswith("![") and line.endswith(".png)"):
            caption, name = line[2:].split("](", 1)
            lines += _image(folder / name[:-1], base, caption)
        else:
            lines.append(line)
    return lines + [""]


def analysis_section(r: dict) -> list[str]:
    lines = [f"### Modality analysis ({r['prediction']}, {r['metric']} on {r['split']}, percentage points)", "",
             "| | text | audio | vision | balance |", "|---|---|---|---|---|",
             "| Shapley contribution | " + " | ".join(f"{100 * r['shapley'][m]:+.2f}" for m in ("text", "audio", "vision"))
             + f" | {r['shapley_balance']:.3f} |"]
    if "nde_shares" in r:
        lines.append("| NDE share (bias removed) | " + " | ".join(f"{r['nde_shares'][m]:.3f}"
                                                                for m in ("text", "audio", "vision"))
                     + f" | {r['nde_balance']:.3f} |")
    rob = r["robustness"]
    lines += ["", "| removal | " + " | ".join(rob["removals"]) + " | drop std |",
              "|---" * (len(rob["removals"]) + 2) + "|",
              "| drop | " + " | ".join(f"{100 * v['drop']:+.2f}" for v in rob["removals"].values())
              + f" | {100 * rob['drop_std']:.2f} |", ""]
    return lines


def write_report(path: Path, run_dirs: list[Path], analyses: dict, charts: dict | None = None,
                 gather: bool = False) -> Path:
    """The report at `path` for the runs (in order), with `analyses` as analyze_runs computed them and
    `charts` ({caption: figure path}) the analysis charts drawn beside it. With `gather`, the runs'
    pictures are copied beside the report, so that its folder stands alone."""
    path = Path(path)
    base = path.parent
    labels = [f"{Path(r).parent.name}/{Path(r).name}" for r in run_dirs]
    lines = ["# Report: " + ", ".join(labels), ""]
    for run_dir, label in zip(run_dirs, labels):
        lines += run_section(Path(run_dir), label, analyses.get(label), base, gather)
    drawn = {caption: Path(png) for caption, png in (charts or {}).items() if Path(png).is_file()}
    if drawn:
        lines += ["## Modality analysis charts", ""]
        for caption, png in drawn.items():
            lines += _image(png, base, caption)
    write_text(path, "\n".join(lines).rstrip() + "\n")
    return path
