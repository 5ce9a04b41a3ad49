"""Modality contributions, balance, removal reports, multi-seed summaries and plots."""
import csv
import json
import math
import sys

import numpy as np
import pytest
import torch

from src.analysis import (
    MODALITIES,
    SUBSETS,
    balance_index,
    collect_runs,
    flatten_metrics,
    format_summary,
    nde_shares,
    removal_report,
    removal_scores_from_subsets,
    shapley_values,
    summarize,
    write_csv,
)
from src.errors import UserError


def _scores(score_of) -> dict:
    return {subset: score_of(subset) for subset in SUBSETS}


# ---------------------------------------------------------------------------------------------------- Shapley


def test_subsets_are_the_eight_presence_subsets():
    assert len(SUBSETS) == 8 == len(set(SUBSETS))
    assert frozenset() in SUBSETS and frozenset(MODALITIES) in SUBSETS
    assert all(subset <= set(MODALITIES) for subset in SUBSETS)


def test_shapley_efficiency_on_random_scores():
    rng = np.random.default_rng(0)
    for _ in range(5):
        scores = {subset: float(rng.uniform()) for subset in SUBSETS}
        values = shapley_values(scores)
        total = scores[frozenset(MODALITIES)] - scores[frozenset()]
        assert sum(values.values()) == pytest.approx(total, abs=1e-12)


def test_shapley_additive_game_returns_the_weights():
    weights = {"text": 0.3, "audio": -0.1, "vision": 0.05}
    values = shapley_values(_scores(lambda s: 0.5 + sum(weights[m] for m in s)))
    assert values == pytest.approx(weights)


def test_shapley_ignored_modality_gets_zero_and_symmetric_ones_are_equal():
    # vision never changes the score; text and audio are interchangeable and interact.
    def score(subset):
        both = {"text", "audio"} <= subset
        return 0.4 + 0.1 * len(subset & {"text", "audio"}) + (0.2 if both else 0.0)

    values = shapley_values(_scores(score))
    assert values["vision"] == pytest.approx(0.0, abs=1e-12)
    assert values["text"] == pytest.approx(values["audio"])
    assert values["text"] == pytest.approx(0.2)  # 0.1 own gain + half of the 0.2 interaction


def test_shapley_needs_every_subset():
    scores = _scores(lambda s: len(s))
    del scores[frozenset({"audio"})]
    with pytest.raises(ValueError, match="missing"):
        shapley_values(scores)


def test_shapley_accepts_plain_iterables_as_keys():
    scores = {tuple(sorted(s)): float(len(s)) for s in SUBSETS}
    assert shapley_values(scores) == pytest.approx({"text": 1.0, "audio": 1.0, "vision": 1.0})


# ---------------------------------------------------------------------------------------------------- NDE, balance


def test_nde_shares_normalise_mean_absolute_effects():
    shares = nde_shares(np.array([[1.0, -1.0]]), torch.tensor([[-2.0, 2.0]]), np.array([[0.0, 2.0]]))
    assert shares == pytest.approx({"text": 0.25, "audio": 0.5, "vision": 0.25})
    zero = nde_shares(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)))
    assert all(math.isnan(v) for v in zero.values())


def test_balance_index():
    assert balance_index({"text": 0.2, "audio": 0.2, "vision": 0.2}) == pytest.approx(1.0)
    assert balance_index({"text": 0.3, "audio": 0.0, "vision": 0.0}) == pytest.approx(0.0)
    half = balance_index({"text": 0.5, "audio": 0.5, "vision": 0.0})
    assert half == pytest.approx(math.log(2) / math.log(3))
    skewed = balance_index({"text": 0.8, "audio": 0.1, "vision": 0.1})
    assert 0.0 < skewed < half < 1.0
    # Magnitudes count: a negative contribution is still influence.
    assert balance_index({"text": -0.2, "audio": 0.2, "vision": 0.2}) == pytest.approx(1.0)
    assert math.isnan(balance_index({"text": 0.0, "audio": 0.0, "vision": 0.0}))


# ---------------------------------------------------------------------------------------------------- removals


def test_removal_report_hand_example():
    scores = {"t": 0.6, "a": 0.7, "v": 0.8, "ta": 0.5, "tv": 0.6, "av": 0.7}
    report = removal_report(0.8, scores)
    drops = [report["removals"][k]["drop"] for k in ("t", "a", "v", "ta", "tv", "av")]
    assert drops == pytest.approx([0.2, 0.1, 0.0, 0.3, 0.2, 0.1])
    assert report["removals"]["ta"]["score"] == 0.5
    assert report["drop_mean"] == pytest.approx(0.15)
    # Population std: squared deviations sum to 0.055 over 6 removals.
    assert report["drop_std"] == pytest.approx(math.sqrt(0.055 / 6))


def test_removal_report_lower_is_better_and_validation():
    report = removal_report(0.6, {"t": 0.9, "v": 0.6}, higher_is_better=False)  # MAE grows when text goes
    assert report["removals"]["t"]["drop"] == pytest.approx(0.3)
    assert report["drop_std"] == pytest.approx(0.15)
    with pytest.raises(ValueError):
        removal_report(0.8, {"x": 0.1})
    with pytest.raises(ValueError):
        removal_report(0.8, {})


def test_removal_scores_from_subsets():
    scores = _scores(lambda s: float(len(s)) + (0.5 if "text" in s else 0.0))
    removals = removal_scores_from_subsets(scores)
    assert removals == {"t": 2.0, "a": 2.5, "v": 2.5, "ta": 1.0, "tv": 1.0, "av": 1.5}


# ---------------------------------------------------------------------------------------------------- summaries


def _write_run(directory, avg_acc, mae=None):
    directory.mkdir(parents=True)
    test = {"tie": {"avg_acc": avg_acc, "note": "text is ignored", "flags": [1, 2]}, "done": True}
    if mae is not None:
        test["tie"]["mae"] = mae
    (directory / "metrics.json").write_text(json.dumps({"best_loss": {"test": test}, "epochs": 3}))
    return directory


def test_flatten_metrics_keeps_numeric_leaves_only():
    flat = flatten_metrics({"a": {"b": {"acc": 1, "name": "x", "ok": True, "none": None}}, "n": 2.5})
    assert flat == {"a/b/acc": 1.0, "n": 2.5}


def test_summarize_mean_std_csv_and_table(tmp_path):
    baseline = [_write_run(tmp_path / f"mult_seed{i}", acc, mae) for i, (acc, mae) in
                enumerate([(0.80, 0.5), (0.82, 0.7), (0.84, None)])]
    causal = [_write_run(tmp_path / "causalmer_seed0", 0.85)]
    (tmp_path / "mult_seed_unfinished").mkdir()  # no metrics.json: not a run

    assert collect_runs(tmp_path, "mult_seed*") == baseline
    rows = summarize({"mult": collect_runs(tmp_path, "mult_seed*"), "causalmer": causal})
    by_key = {(r["group"], r["metric"]): r for r in rows}

    accuracy = by_key[("mult", "best_loss/test/tie/avg_acc")]
    assert accuracy["n"] == 3
    assert accuracy["mean"] == pytest.approx(0.82)
    assert accuracy["std"] == pytest.approx(0.02)  # sample std (ddof=1)
    mae = by_key[("mult", "best_loss/test/tie/mae")]
    assert (mae["n"], mae["mean"], mae["std"]) == (2, pytest.approx(0.6), pytest.approx(math.sqrt(0.02)))
    single = by_key[("causalmer", "best_loss/test/tie/avg_acc")]
    assert single["n"] == 1 and math.isnan(single["std"])  # one seed: no spread, never 0
    assert ("mult", "best_loss/test/done") not in by_key
    assert by_key[("mult", "epochs")]["mean"] == 3.0

    path = write_csv(rows, tmp_path / "out" / "summary.csv")
    with path.open(newline="") as handle:
        read = list(csv.DictReader(handle))
    assert len(read) == len(rows)
    assert read[0].keys() == {"group", "metric", "unit", "n", "mean", "std"}
    first = next(r for r in read if r["group"] == "mult" and r["metric"].endswith("avg_acc"))
    assert float(first["mean"]) == pytest.approx(82.0) and int(first["n"]) == 3 and first["unit"] == "%"
    assert next(r for r in read if r["group"] == "causalmer" and r["metric"].endswith("avg_acc"))["std"] == ""

    table = format_summary(rows, ["mult", "causalmer"], keys=["*/avg_acc", "*/mae"])
    lines = table.splitlines()
    assert "mult" in lines[0] and "causalmer" in lines[0] and "-" not in lines[0]  # no difference column
    acc_line = next(line for line in lines if line.startswith("best_loss/test/tie/avg_acc"))
    assert "82.0 ± 2.0 (n=3)" in acc_line and acc_line.endswith("85.0 ± — (n=1)")
    mae_line = next(line for line in lines if line.startswith("best_loss/test/tie/mae"))
    assert "0.600 ± 0.141 (n=2)" in mae_line and mae_line.rstrip().endswith("-")
    assert not any(line.startswith("epochs") for line in lines)


def test_summarize_reports_user_errors(tmp_path):
    with pytest.raises(UserError, match="no runs"):
        summarize({"mult": []})
    with pytest.raises(UserError, match="metrics.json"):
        summarize({"mult": [tmp_path]})
    (tmp_path / "metrics.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        summarize({"mult": [tmp_path]})


# ---------------------------------------------------------------------------------------------------- plots

CONTRIBUTIONS = {"mult": {"text": 0.2, "audio": 0.05, "vision": -0.01},
                 "causalmer": {"text": (0.12, 0.02), "audio": (0.08, 0.01), "vision": (0.06, 0.02)}}
DROPS = {"mult": dict(zip(("t", "a", "v", "ta", "tv", "av"), (0.2, 0.01, 0.02, 0.25, 0.22, 0.03))),
         "causalmer": dict(zip(("t", "a", "v", "ta", "tv", "av"), (0.1, 0.05, 0.04, 0.14, 0.12, 0.08)))}


def test_plots_write_png_files(tmp_path):
    pytest.importorskip("matplotlib")
    from src.analysis.plots import plot_contributions, plot_removal_drops

    for path in (plot_contributions(CONTRIBUTIONS, tmp_path / "contributions.png", "Shapley values"),
                 plot_removal_drops(DROPS, tmp_path / "nested" / "drops.png", "Removal drops"),
                 plot_contributions({"causalmer": CONTRIBUTIONS["mult"]}, tmp_path / "one.png")):
        assert path is not None and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_return_none_without_matplotlib(tmp_path, monkeypatch):
    from src.analysis.plots import plot_contributions, plot_removal_drops

    # A None entry in sys.modules makes the import raise ImportError, as if matplotlib were not installed.
    for name in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    assert plot_contributions(CONTRIBUTIONS, tmp_path / "c.png") is None
    assert plot_removal_drops(DROPS, tmp_path / "d.png") is None
    assert not any(tmp_path.iterdir())


def test_charts_are_in_points_with_error_bars_over_the_seeds_of_a_label():
    from src.commands.analyze import chart_values

    values = {"causal/seed1": {"text": 0.10, "audio": 0.02}, "causal/seed2": {"text": 0.14, "audio": 0.04},
              "mult/seed1": {"text": 0.05, "audio": 0.01}}
    charted = chart_values({"CausalMER": ["causal/seed1", "causal/seed2"], "MulT": ["mult/seed1"]}, values)
    mean, std = charted["CausalMER"]["text"]
    assert (mean, std) == (pytest.approx(12.0), pytest.approx(100 * np.std([0.10, 0.14], ddof=1)))
    assert charted["MulT"] == {"text": pytest.approx(5.0), "audio": pytest.approx(1.0)}  # one run: no error bar


def test_analyze_refuses_a_label_count_that_does_not_match_the_runs(tmp_path):
    from src.commands.analyze import analyze_runs

    with pytest.raises(UserError, match="--label is given 1 times for 2 runs"):
        analyze_runs([tmp_path / "a", tmp_path / "b"], labels=["x"])
