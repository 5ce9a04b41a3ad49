"""The paper table of compare/summarize: its statistics (paired t-test, paired bootstrap) and its rows."""
import csv
import io
import json
import math

import numpy as np
import pytest

from src.eval.stats import incomplete_beta, paired_bootstrap, paired_t_test, t_two_sided_p
from src.analysis.table import build_table, render
from src.errors import UserError
from src.eval.metrics import compute_metrics, headline_hits
from tests.helpers import run


# ------------------------------------------------------------------------------------------------ statistics
def t_p_closed_form(t: float, df: int) -> float:
    """Two-sided p of Student's t for 1, 2 and 3 degrees of freedom, from their closed-form CDFs."""
    t = abs(t)
    if df == 1:
        return 1.0 - 2.0 / math.pi * math.atan(t)
    if df == 2:
        return 1.0 - t / math.sqrt(2.0 + t * t)
    if df == 3:
        x = t / math.sqrt(3.0)
        cdf = 0.5 + (x / (1.0 + x * x) + math.atan(x)) / math.pi
        return 2.0 * (1.0 - cdf)
    raise ValueError(df)


@pytest.mark.parametrize("df", [1, 2, 3])
@pytest.mark.parametrize("t", [0.0, 0.3, 1.0, 2.5, 7.0, -4.0])
def test_t_test_p_values_match_the_closed_forms(t, df):
    assert t_two_sided_p(t, df) == pytest.approx(t_p_closed_form(t, df), abs=1e-10)


def test_p_values_match_printed_tables():
    # Critical values of Student's t tables: two-sided 5% at df 4 and 10, 1% at df 30.
    assert t_two_sided_p(2.776445, 4) == pytest.approx(0.05, abs=1e-5)
    assert t_two_sided_p(2.228139, 10) == pytest.approx(0.05, abs=1e-5)
    assert t_two_sided_p(2.749996, 30) == pytest.approx(0.01, abs=1e-5)
    # I_x(a, 1) = x^a and I_x(1, b) = 1 - (1 - x)^b.
    assert incomplete_beta(2.5, 1.0, 0.3) == pytest.approx(0.3 ** 2.5, rel=1e-10)
    assert incomplete_beta(1.0, 3.5, 0.8) == pytest.approx(1 - 0.2 ** 3.5, rel=1e-10)


def test_paired_t_test():
    result = paired_t_test([1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 3.0, 7.0])  # differences 1, 2, 0, 3
    std = math.sqrt(5 / 3)
    assert (result["n"], result["mean"], result["std"]) == (4, 1.5, pytest.approx(std))
    assert result["t"] == pytest.approx(1.5 / (std / 2))
    assert result["p"] == pytest.approx(t_p_closed_form(result["t"], 3))
    single = paired_t_test([0.5], [0.7])
    assert single["mean"] == pytest.approx(0.2) and math.isnan(single["std"]) and math.isnan(single["p"])
    assert paired_t_test([1, 2], [2, 3])["p"] == 0.0  # identical differences: certain, not undefined


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    first = rng.integers(0, 2, size=(2, 400)).astype(float)
    second = first.copy()
    second[:, :40] = 1.0 - second[:, :40]  # flip 40 of 400 samples in both seeds
    result = paired_bootstrap(first, second, resamples=500)
    true = float((second - first).mean())
    assert result["mean"] == pytest.approx(true)
    assert result["low"] < true < result["high"] and result["high"] - result["low"] < 0.2
    assert paired_bootstrap(first, second, resamples=500) == result  # fixed seed: reproducible
    same = paired_bootstrap(first, first + 0.25, resamples=300)
    assert same["low"] == pytest.approx(0.25) and same["high"] == pytest.approx(0.25)
    with pytest.raises(ValueError):
        paired_bootstrap(first, second[:, :10])


@pytest.mark.parametrize("task", ["binary", "cls", "regression", "sims_cls", "sims_regression"])
def test_headline_hits_average_to_the_headline(task):
    rng = np.random.default_rng(1)
    n = 60
    if task == "binary":
        logits, target, key = rng.normal(size=(n, 8)), rng.integers(0, 2, size=(n, 4)), "avg_acc"
    elif task == "cls":
        logits, target, key = rng.normal(size=(n, 7)), rng.integers(0, 7, size=n), "acc7"
    elif task == "regression":
        logits, target, key = rng.normal(size=(n, 1)) * 2, rng.normal(size=n) * 2, "acc7"
    elif task == "sims_cls":
        logits, target, key = rng.normal(size=(n, 5)), rng.integers(0, 5, size=n), "acc5"
    else:
        logits, target, key = rng.normal(size=(n, 1)), rng.uniform(-1, 1, size=n), "acc5"
    hits = headline_hits(logits, target, task)
    assert hits.shape == (n,)
    assert hits.mean() == pytest.approx(compute_metrics(logits, target, task)[key])


# ------------------------------------------------------------------------------------------------ the table
def write_run(run_dir, model, predictions, task="binary", robustness=None, npz=None):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"dataset: iemocap\ndata: {{task: {task}, aligned: true}}\n"
                                         f"model: {{name: {model}, backbone: mult}}\n")
    test = {"loss": 0.3 if model == "causalmer" else 0.9, "predictions": predictions}
    (run_dir / "metrics.json").write_text(json.dumps({"best_acc": {"epoch": 1, "test": test},
                                                      "best_loss": {"epoch": 1, "test": test}}))
    if robustness is not None:
        (run_dir / "robustness").mkdir()
        (run_dir / "robustness" / "robustness.json").write_text(json.dumps(robustness))
    if npz is not None:
        np.savez(run_dir / "predictions_test.npz", **npz)
    return run_dir


ALONE = [0.80, 0.82, 0.81]
TIE = [0.83, 0.86, 0.82]


def make_groups(tmp_path, seeds=3, predictions=False):
    rng = np.random.default_rng(2)
    target = rng.integers(0, 2, size=(50, 4))
    index = np.arange(50)
    alone, causal = [], []
    for k in range(seeds):
        npz_alone = npz_causal = None
        if predictions:
            shuffled = rng.permutation(50)  # stored in another order: the reader sorts by index
            npz_alone = {"index": index[shuffled], "target": target[shuffled], "logits_m": rng.normal(size=(50, 8))[shuffled]}
            npz_causal = {"index": index, "target": target, "logits_tie": rng.normal(size=(50, 8)),
                          "logits_m": rng.normal(size=(50, 8))}
        alone.append(write_run(tmp_path / "alone" / f"seed{k + 1}", "backbone",
                               {"m": {"avg_acc": ALONE[k], "avg_f1": ALONE[k] - 0.01, "neutral_acc": 0.5}},
                               npz=npz_alone))
        causal.append(write_run(tmp_path / "causal" / f"seed{k + 1}", "causalmer",
                                {p: {"avg_acc": v, "avg_f1": v} for p, v in (("tie", TIE[k]), ("te", 0.8), ("m", 0.7))},
                                robustness={"metric": "avg_acc", "accuracy": {"all": {"tie_alpha": 0.84, "tie": TIE[k]}},
                                            "alpha": {"selected": 0.5}, "missing": {"auilc": {}},
                                            "bootstrap": {"intervals": {}}}, npz=npz_causal))
    return {"mult": alone, "causalmer": causal}


def test_table_rows_units_and_paired_difference(tmp_path):
    table = build_table(make_groups(tmp_path))
    assert table.metrics == ["avg_acc", "avg_f1"]
    labels = [row[0] for row in table.rows]
    assert labels == ["mult (backbone alone)", "causalmer: m (its backbone)", "causalmer: te (fused)",
                      "causalmer: tie (debiased)", "causalmer: tie_alpha (α = 0.5, chosen on valid)",
                      "tie − mult alone"]
    cells = dict((row[0], row[2]) for row in table.rows)
    alone = cells["mult (backbone alone)"]["avg_acc"]
    assert (alone.n, alone.mean, alone.std) == (3, pytest.approx(81.0), pytest.approx(1.0))  # percent
    assert cells["causalmer: tie_alpha (α = 0.5, chosen on valid)"]["avg_acc"].mean == pytest.approx(84.0)
    assert cells["causalmer: tie_alpha (α = 0.5, chosen on valid)"]["avg_f1"].n == 0  # headline only
    difference = cells["tie − mult alone"]["avg_acc"]
    expected = paired_t_test([100 * a for a in ALONE], [100 * t for t in TIE])
    assert difference.mean == pytest.approx(2.6667, abs=1e-3) and difference.p == pytest.approx(expected["p"])
    assert difference.interval is None  # no predictions files
    text = render(table)
    assert "| avg_acc (%) |" in text.splitlines()[2] and "81.0 ± 1.0" in text
    assert f"+2.7 ± {expected['std']:.1f} (p = {expected['p']:.3g})" in text
    assert "loss" not in text.split("|", 1)[1]  # losses of different objectives are never compared
    assert "neutral_acc" not in text


def test_table_with_one_seed_shows_no_std_and_no_test(tmp_path):
    text = render(build_table(make_groups(tmp_path, seeds=1)))
    assert "80.0 ± —" in text and "± 0.0" not in text
    assert "+3.0 ± — (no test)" in text


def test_table_bootstrap_interval_from_predictions(tmp_path):
    groups = make_groups(tmp_path, predictions=True)
    table = build_table(groups)
    difference = dict((row[0], row[2]) for row in table.rows)["tie − mult alone"]["avg_acc"]
    low, high = difference.interval
    # The interval is about the predictions files' difference, which the reader aligned by sample index.
    hits = []
    for label, key in (("mult", "m"), ("causalmer", "tie")):
        per_seed = []
        for run_dir in groups[label]:
            saved = np.load(run_dir / "predictions_test.npz")
            order = np.argsort(saved["index"])
            per_seed.append(headline_hits(saved[f"logits_{key}"][order], saved["target"][order], "binary"))
        hits.append(np.stack(per_seed))
    centre = 100 * float((hits[1] - hits[0]).mean())
    assert low < centre < high
    assert "paired bootstrap" in render(table)


def test_table_formats(tmp_path):
    table = build_table(make_groups(tmp_path))
    latex = render(table, "latex")
    assert r"\begin{tabular}{lrrr}" in latex and r"avg\_acc (\%)" in latex and r"81.0 $\pm$ 1.0" in latex
    rows = list(csv.DictReader(io.StringIO(render(table, "csv"))))
    first = next(r for r in rows if r["predictor"] == "mult (backbone alone)" and r["metric"] == "avg_acc")
    assert (first["unit"], float(first["mean"]), float(first["std"])) == ("%", pytest.approx(81.0), pytest.approx(1.0))
    assert next(r for r in rows if r["predictor"].startswith("tie −") and r["metric"] == "avg_acc")["p"] != ""


def test_table_refuses_broken_robustness_file(tmp_path):
    groups = make_groups(tmp_path, seeds=1)
    (groups["causalmer"][0] / "robustness" / "robustness.json").write_text(json.dumps({"accuracy": {}}))
    with pytest.raises(UserError, match="tie_alpha"):
        build_table(groups)


def test_summarize_prints_the_paper_table_and_writes_it(capsys, tmp_path):
    make_groups(tmp_path)
    args = ["summarize", "--group", f"mult={tmp_path / 'alone'}", "--group", f"causalmer={tmp_path / 'causal'}"]
    code, out, err = run(capsys, *args, "--format", "latex")
    assert code == 0, err
    assert r"\begin{tabular}" in out and "best_acc/test" not in out  # no per-metric rows without --full
    assert (tmp_path / "alone" / "summary_table.tex").read_text().strip() in out
    code, out, err = run(capsys, *args, "--full")
    assert code == 0, err
    assert "best_acc/test/predictions/tie/avg_acc" in out and "| tie − mult alone | 3 |" in out
    summary = list(csv.DictReader((tmp_path / "alone" / "summary.csv").open()))
    row = next(r for r in summary if r["metric"] == "best_acc/test/predictions/m/avg_acc")
    assert (row["unit"], float(row["mean"])) == ("%", pytest.approx(81.0))


def test_summary_refuses_a_robustness_file_it_cannot_read_by_name(tmp_path):
    from src.analysis.summary import robustness_metrics

    groups = make_groups(tmp_path, seeds=1)
    (groups["causalmer"][0] / "robustness" / "robustness.json").write_text(json.dumps({"accuracy": {}}))
    with pytest.raises(UserError, match="robustness.json is not a robustness result"):
        robustness_metrics(groups["causalmer"][0])
