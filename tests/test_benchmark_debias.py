"""The debiasing benchmark end to end on its tiny --quick setting: it runs, and its JSON is complete."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from src.modalities import MODALITIES

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_writes_a_complete_report(tmp_path):
    output = tmp_path / "debias.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "benchmarks/debias.py", "--quick", "--output", str(output),
                             "--work-dir", str(tmp_path / "work")],
                            cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| strength | fusion | branches |" in result.stdout  # the markdown table was printed

    report = json.loads(output.read_text())
    assert report["benchmark"] == "debias"
    assert report["failed_runs"] == []
    assert report["wall_time_s"] > 0 and report["machine"]["cpu_count"] >= 1
    setting = report["setting"]
    assert setting["size"] == "quick" and setting["bias_modality"] in MODALITIES
    # Every seed gives one baseline run and one CausalMER run per (fusion, branches).
    per_strength = len(setting["seeds"]) * (1 + len(setting["fusion"]) * len(setting["branches"]))
    assert len(report["runs"]) == per_strength * len(setting["bias_strength"])
    assert len(report["summary"]) == len(setting["bias_strength"]) * len(setting["fusion"]) * len(setting["branches"])

    for entry in report["summary"]:
        per_seed = entry["per_seed"]
        assert per_seed["seed"] == setting["seeds"]
        for name in ("baseline", "te", "tie", "causalmer_m"):
            assert len(per_seed[name]) == len(setting["seeds"])
            assert all(0.0 <= v <= 1.0 for v in per_seed[name]), (name, per_seed[name])
        for name in ("drop_std_baseline", "drop_std_te", "drop_std_tie"):
            assert all(v >= 0.0 and math.isfinite(v) for v in per_seed[name]), (name, per_seed[name])
        for stats in entry["mean"].values():
            assert math.isfinite(stats["mean"]) and stats["std"] >= 0.0
        for split in ("train", "test"):
            assert all(0.0 <= entry["branch_acc"][split][m]["mean"] <= 1.0 for m in MODALITIES)
        assert all(math.isfinite(entry["constants_last"][m]["mean"]) for m in MODALITIES)
        assert all(entry["mean_abs_nde_test"][m]["mean"] >= 0.0 for m in (*MODALITIES, "te"))
        # Where the shortcut stops paying: the robustness command on each seed's pair of runs.
        rob = entry["robustness"]
        shortcut = setting["bias_modality"]
        assert {"all", f"conflicting_{shortcut}", f"aligned_{shortcut}"} <= set(rob["accuracy"])
        assert set(rob["accuracy"]["all"]) == {"baseline", "m", "te", "tie", "tie_alpha"}
        assert len(rob["alpha_selected"]) == len(setting["seeds"])
        assert all(a in rob["alpha_grid"] for a in rob["alpha_selected"])
        assert rob["missing_rates"] == setting["robustness"]["rates"]
        assert len(rob["intervals"]) == len(setting["seeds"]) and "tie-baseline" in rob["intervals"][0]

    for run in report["runs"]:
        predictions = ("te", "tie", "m") if run["job"]["model"] == "causalmer" else ("m",)
        assert set(run["shapley"]) == set(predictions)
        for name in predictions:
            # Efficiency: the contributions add up to the full-input score minus the no-input score.
            total = sum(run["shapley"][name][m] for m in MODALITIES)
            assert math.isclose(total, run["test"][name] - run["empty"][name], abs_tol=1e-9)
            assert run["subsets"][name]["t+a+v"] == run["test"][name]
            removal = run["removal"][name]
            assert len(removal["removals"]) == 6 and removal["drop_std"] >= 0.0
        if run["job"]["model"] == "causalmer":
            assert 0.0 <= run["margins"]["tie_te_flip_rate"] <= 1.0
            assert all(run["margins"][k] >= 0.0 for k in (*MODALITIES, "te"))
