"""Analysis of trained models: modality contributions, balance, missing-modality robustness, multi-seed summaries.

``contributions`` and ``summary`` need only numpy; ``plots`` draws PNG charts when the optional
matplotlib extra is installed.
"""
from ..eval.contributions import (
    balance_index,
    nde_shares,
    removal_report,
    removal_scores_from_subsets,
    shapley_values,
    subset_label,
)
from ..modalities import MODALITIES, REMOVALS, SUBSETS
from .summary import collect_runs, flatten_metrics, format_summary, summarize, write_csv

__all__ = [
    "MODALITIES",
    "REMOVALS",
    "SUBSETS",
    "balance_index",
    "collect_runs",
    "flatten_metrics",
    "format_summary",
    "nde_shares",
    "removal_report",
    "removal_scores_from_subsets",
    "shapley_values",
    "subset_label",
    "summarize",
    "write_csv",
]
