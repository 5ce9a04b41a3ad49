"""benchmarks/speed.py --quick end to end: every group runs at tiny sizes and writes a well-formed JSON.

Only structure and sanity are checked (numbers present, finite, positive); timings on a shared machine
are too noisy for thresholds.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from src.models.engine import ENGINES
from tests.helpers import benchmark_module

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("reference", "published", "layouts", "pmr", "data", "compile", "dmd")
LAYOUTS = ("iemocap_aligned", "iemocap_unaligned", "mosei_aligned", "mosei_unaligned", "mosi_aligned",
           "mosi_unaligned")
MODEL_ROW_NUMBERS = ("train_step_s", "train_ms_per_sample", "eval_samples_per_s", "train_peak_rss_gb",
                     "peak_rss_gb", "parameters", "batch", "eval_batch")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    output = tmp_path_factory.mktemp("speed") / "x.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "speed.py"), "--quick", "--output", str(output)],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(output.read_text())


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.slow
def test_machine_info_and_groups(results):
    machine = results["machine"]
    for key in ("cpu_count", "threads", "torch", "platform", "loadavg_start"):
        assert key in machine
    assert results["quick"] is True
    assert list(results["groups"]) == list(GROUPS)
    for group in results["groups"].values():
        assert len(group["loadavg_start"]) == 3
        assert all(math.isfinite(v) and v >= 0 for v in group["loadavg_start"])
        assert group["rows"]


@pytest.mark.slow
def test_model_rows_cover_every_layout_and_kind(results):
    layouts = results["groups"]["layouts"]["rows"]
    for layout in LAYOUTS:
        for label in ("mult", "causalmer+pool", "causalmer+transformer", "causalmer+resnet18"):
            assert f"{layout}/{label}" in layouts
    reference = results["groups"]["reference"]["rows"]
    assert set(reference) == {f"mult_iemocap_{layout}/{engine}" for layout in ("aligned", "unaligned")
                              for engine in ENGINES}
    assert all(reference[name]["engine"] == name.split("/")[1] for name in reference)
    assert set(results["groups"]["published"]["rows"]) == {"published_iemocap_aligned", "default_iemocap_aligned"}
    assert results["groups"]["published"]["rows"]["published_iemocap_aligned"]["branches"] == {
        "text": "albert", "audio": "resnet18", "vision": "resnet18"}
    assert len(results["groups"]["pmr"]["rows"]) == 4


@pytest.mark.slow
def test_model_numbers_are_finite_and_positive(results):
    for name in ("reference", "layouts", "published", "pmr", "dmd"):
        for row_name, row in results["groups"][name]["rows"].items():
            assert "error" not in row, f"{name}/{row_name}: {row.get('error')}"
            for key in MODEL_ROW_NUMBERS:
                assert positive(row[key]), f"{name}/{row_name}: {key} = {row.get(key)}"
            assert len(row["lengths"]) == 3 and all(positive(v) for v in row["lengths"])
            assert row["train_repeats"] >= 1 and row["eval_repeats"] >= 1


@pytest.mark.slow
def test_compile_rows_time_the_compiling_calls_apart(results):
    rows = results["groups"]["compile"]["rows"]
    assert set(rows) == {"iemocap_aligned/mult/eager", "iemocap_aligned/mult/compile"}  # --quick: aligned only
    for name, row in rows.items():
        assert "error" not in row, f"{name}: {row.get('error')}"
        for key in MODEL_ROW_NUMBERS + ("compile_s", "eval_compile_s"):
            assert positive(row[key]), f"{name}: {key} = {row.get(key)}"
    compiled, eager = rows["iemocap_aligned/mult/compile"], rows["iemocap_aligned/mult/eager"]
    assert compiled["compile"] is True and compiled["module"] == "OptimizedModule"
    assert compiled["compile_backend"] == "eager"  # --quick traces the model, builds no kernels
    assert eager["compile"] is False and eager["module"] == "BackboneOnly" and eager["compile_backend"] is None


@pytest.mark.slow
def test_data_path_numbers(results):
    data = results["groups"]["data"]["rows"]
    assert data["deleted"] is True
    assert not Path(data["tmp_dir"]).exists()
    for label in ("large", "small"):
        assert positive(data[label]["write"]["file_gb"])
        assert positive(data[label]["convert"]["seconds"]) and positive(data[label]["convert"]["peak_rss_gb"])
        assert positive(data[label]["train"]["train_peak_rss_gb"]) and positive(data[label]["train"]["step_s"])
    assert data["large"]["write"]["file_gb"] > data["small"]["write"]["file_gb"]
    summary = results["summary"]["data_path"]
    assert positive(summary["train_peak_ratio_large_over_small"])


@pytest.mark.slow
def test_summary_compares_published_and_default(results):
    entry = results["summary"]["published_vs_default"]
    assert positive(entry["speedup_vs_published_measured"])
    assert positive(entry["default_s_per_sample"]) and positive(entry["published_s_per_sample"])


def test_only_rejects_unknown_groups_and_keeps_dmd_last():
    speed = speed_module()
    assert speed.parse_groups("dmd,reference") == ["reference", "dmd"]
    with pytest.raises(SystemExit, match="unknown group"):
        speed.parse_groups("reference,nonsense")


def test_a_row_measured_in_several_processes_keeps_the_median_one():
    speed = speed_module()
    runs = [{"train_step_s": 0.3, "tag": "slow"}, {"error": "crashed"}, {"train_step_s": 0.1, "tag": "fast"},
            {"train_step_s": 0.2, "tag": "middle"}]
    chosen = speed.median_process(runs)
    assert chosen["tag"] == "middle"
    assert chosen["train_step_s_per_process"] == [0.3, None, 0.1, 0.2]
    assert speed.median_process([{"train_step_s": 0.1, "tag": "a"}, {"train_step_s": 0.2, "tag": "b"}])["tag"] == "a"
    assert speed.median_process([{"error": "x"}]) == {"error": "x"}
    assert "train_step_s_per_process" not in speed.median_process([{"train_step_s": 0.1}])


@pytest.mark.slow
def test_computed_columns_are_the_quotients_of_the_measured_ones(results):
    for name in ("reference", "layouts", "published", "pmr", "dmd"):
        for row_name, row in results["groups"][name]["rows"].items():
            assert row["train_ms_per_sample"] == pytest.approx(1e3 * row["train_step_s"] / row["batch"], rel=1e-9), row_name
    published = results["groups"]["published"]["rows"]
    pub, default = published["published_iemocap_aligned"], published["default_iemocap_aligned"]
    entry = results["summary"]["published_vs_default"]
    assert entry["speedup_vs_published_measured"] == pytest.approx(
        (pub["train_step_s"] / pub["batch"]) / (default["train_step_s"] / default["batch"]), rel=1e-9)
    data = results["groups"]["data"]["rows"]
    assert results["summary"]["data_path"]["train_peak_ratio_large_over_small"] == pytest.approx(
        data["large"]["train"]["train_peak_rss_gb"] / data["small"]["train"]["train_peak_rss_gb"], rel=1e-9)


def speed_module():
    return benchmark_module("speed")


def test_summary_figures_are_computed_from_the_rows():
    """The speed-ups, the memory ratio and fast-vs-plain are the quotients of the rows' figures."""
    speed = speed_module()
    row = {"batch": 8, "lengths": [20, 400, 500]}
    rows = {"mult_iemocap_aligned/plain": {**row, "train_step_s": 0.2, "train_peak_rss_gb": 0.6},
            "mult_iemocap_aligned/fast": {**row, "train_step_s": 0.1, "train_peak_rss_gb": 0.5},
            "mult_iemocap_unaligned/fast": {**row, "train_step_s": 2.0, "train_peak_rss_gb": 1.4}}
    summary = speed.summarize({"reference": {"rows": rows}}, quick=False, default_engine="fast")
    aligned, unaligned = summary["mult_iemocap_aligned"], summary["mult_iemocap_unaligned"]
    assert aligned["engine"] == "fast" and aligned["step_s"] == 0.1
    assert aligned["speedup"] == pytest.approx(0.24 / 0.1)
    assert aligned["engines"]["plain"]["speedup"] == pytest.approx(0.24 / 0.2)
    assert aligned["fast_over_plain"] == pytest.approx(2.0)
    assert unaligned["speedup"] == pytest.approx(7.1 / 2.0)
    assert unaligned["memory_ratio"] == pytest.approx(1.4 / 4.2)
    assert "fast_over_plain" not in unaligned  # no plain row to compare with
    assert speed.summarize({"reference": {"rows": rows}}, quick=False, default_engine="plain").keys() == {
        "mult_iemocap_aligned"}
    machine = {"cpu_count": 2, "processor": "x", "threads": 2, "torch": "t", "platform": "p", "device": "cpu"}
    markdown = speed.render_markdown({"machine": machine, "command": "c", "started_utc": "a", "finished_utc": "b",
                                      "groups": {"reference": {"rows": rows, "loadavg_start": [1.0, 1.0, 1.0]}},
                                      "summary": summary})
    assert "| aligned | plain | 8 | 0.200 | 0.24 | 1.20x |" in markdown
    assert "| aligned | fast (default) | 8 | 0.100 | 0.24 | 2.40x |" in markdown and "| 2.00x |" in markdown
