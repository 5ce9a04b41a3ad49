"""Mean ± std over seeds of every metric, groups of runs side by side: printed, and written as a CSV."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError
from ..analysis.summary import check_groups, collect_runs, format_summary, summarize, write_csv
from ..analysis.table import EXTENSIONS, build_table, group_tasks, render
from ..atomic import write_text


def parse_groups(items: list[str]) -> dict[str, list[Path]]:
    """{label: run directories} from LABEL=DIR strings (--group), DIR holding seed*/metrics.json."""
    groups = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"--group expects LABEL=DIR, got '{item}'")
        label, directory = item.split("=", 1)
        if label in groups:
            raise UserError(f"--group label '{label}' is given twice; each group needs its own label")
        runs = collect_runs(Path(directory), "seed*")
        if not runs:
            raise UserError(f"--group {item}: no seed*/metrics.json under {directory}")
        groups[label] = runs
    return groups


def summarize_flags(items: list[str], out: str | None = None, table_format: str = "markdown",
                    full: bool = False) -> Path:
    """summarize_groups of LABEL=DIR strings; `out` defaults to summary.csv in the first DIR."""
    groups = parse_groups(items)
    path = Path(out) if out else Path(items[0].split("=", 1)[1]) / "summary.csv"
    summarize_groups(groups, path, table_format, full)
    return path


def summarize_groups(groups: dict[str, list[Path]], out: Path, table_format: str = "markdown",
                     full: bool = False) -> Path:
    """Check the groups, write every metric's mean ± std to the CSV `out` and the paper table
    (src/analysis/table.py) beside it in `table_format`; print the table (with `full` the per-metric
    summary first). Returns the table's path; groups on different tasks get the per-metric summary alone, and
    the CSV's path is returned."""
    for warning in check_groups(groups):
        print(f"warning: {warning}", file=sys.stderr)
    rows = summarize(groups)
    write_csv(rows, out)
    tasks = group_tasks(groups)
    if len(tasks) != 1 or None in tasks:
        # Groups on other tasks have no common columns: their per-metric summary is all there is to show.
        print(format_summary(rows, list(groups)))
        print(f"\nno paper table: the groups are on tasks {sorted(map(str, tasks))} (a run without config.yaml "
              f"has none), and a table sets runs of one task side by side\nwrote {out} (every metric, accuracies "
              "and F1 in %)")
        return out
    if full:
        print(format_summary(rows, list(groups)))
        print()
    text = render(build_table(groups), table_format)
    path = table_path(Path(out), table_format)
    write_text(path, text.rstrip("\n") + "\n")
    print(text.rstrip("\n"))
    print(f"\nwrote {out} (every metric, accuracies and F1 in %) and {path}")
    return path


def table_path(summary_csv: Path, fmt: str) -> Path:
    """Where the paper table goes: beside the summary CSV, `<stem>_table.<md|tex|csv>`."""
    return summary_csv.with_name(f"{summary_csv.stem}_table.{EXTENSIONS[fmt]}")
