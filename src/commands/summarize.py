"""Mean ± std over seeds of every metric, groups of runs side by side: printed, and written as a CSV."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError
from ..analysis.summary import check_groups, collect_runs, format_summary, summarize, write_csv


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


def summarize_flags(items: list[str], out: str | None = None) -> Path:
    """summarize_groups of LABEL=DIR strings; `out` defaults to summary.csv in the first DIR."""
    groups = parse_groups(items)
    path = Path(out) if out else Path(items[0].split("=", 1)[1]) / "summary.csv"
    summarize_groups(groups, path)
    return path


def summarize_groups(groups: dict[str, list[Path]], out: Path) -> None:
    """Print the table of `groups` ({label: run directories}) and write it to the CSV `out`."""
    for warning in check_groups(groups):
        print(f"warning: {warning}", file=sys.stderr)
    rows = summarize(groups)
    write_csv(rows, out)
    print(format_summary(rows, list(groups)))
    print(f"\nwrote {out}")
