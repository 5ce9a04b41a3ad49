"""benchmarks/gpu_check.sh on a machine without CUDA, and the GPU report's tables on a made-up result."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import benchmark_module

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu():
    return benchmark_module("gpu")


def test_without_cuda_it_says_so_in_one_line_and_exits_0(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU machine
    done = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--out-dir", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], done.stdout
    assert list(tmp_path.iterdir()) == []


def test_speed_rows_cover_each_layout_variant_and_precision(gpu):
    chunks = gpu.speed_rows()
    names = [row["name"] for chunk in chunks for row in chunk]
    variants = [engine or "default" for engine in gpu.ENGINES] + ["compile"]
    expected = {f"{layout}/{backbone}/{variant}/{precision}" for layout, backbone, _ in gpu.SPEED_ROWS
                for variant in variants for precision in ("fp32", "bf16")}
    assert len(names) == len(set(names)) and set(names) == expected
    assert not any(row["compile"] for row in chunks[0])  # the cheap eager rows run first
    assert all(row["compile"] for chunk in chunks[1:] for row in chunk)
    for chunk in chunks:
        for row in chunk:
            assert row["amp"] == (row["precision"] == "bf16") and row["model"] == "backbone"
            assert row["batch"] == dict((layout, batch) for layout, _, batch in gpu.SPEED_ROWS)[row["layout"]]


def fake_results() -> dict:
    measured = {"batch": 32, "compile_s": 41.5, "train_step_s": 0.01234, "train_ms_per_sample": 0.3856,
                "eval_compile_s": 12.25, "eval_samples_per_s": 15321.0, "train_cuda_peak_gb": 0.512,
                "eval_cuda_peak_gb": 0.25}
    return {
        "machine": {"torch": "2.5.1", "platform": "Linux", "cuda_device": "Fake GPU", "cuda": "12.4", "gpus": 1},
        "command": "bash benchmarks/gpu_check.sh", "started_utc": "s", "finished_utc": "f", "wall_s": 431.0,
        "parts": {
            "tests": {"rc": 1, "timed_out": False, "seconds": 80.0, "tests": 10, "passed": 7, "failures": 1,
                      "errors": 0, "skipped": 2, "failed_names": ["tests.test_devices::test_ddp_nccl_start"]},
            "speed": {"rows": {"iemocap_aligned/mult/compile/bf16": measured,
                               "mosei_unaligned/pmr/compile/fp32": {"error": "timed out after 50 s"}}},
            "demo": {"rc": 0, "timed_out": False, "seconds": 61.0,
                     "demo_causalmer": {"test_avg_acc": {"tie": 0.75, "te": 0.5, "m": 0.625}, "epoch_seconds": [3.5, 2.25]}},
        },
    }


def test_report_tables_of_a_made_up_result(gpu, tmp_path):
    results = fake_results()
    json_path, md_path = gpu.write_results(results, tmp_path / "out")
    assert json.loads(json_path.read_text()) == results
    text = md_path.read_text()
    assert text == gpu.render_markdown(results)
    assert "Fake GPU (CUDA 12.4, 1 GPU(s)), torch 2.5.1" in text
    assert "7 passed, 1 failures, 0 errors, 2 skipped (exit status 1, 80 s)." in text
    assert "- failed: `tests.test_devices::test_ddp_nccl_start`" in text
    assert "| iemocap_aligned | mult | compile | bf16 | 32 | 41.50 | 0.0123 | 0.39 | 12.25 | 15321 | 0.512 | 0.250 |" in text
    assert "| mosei_unaligned | pmr | compile | fp32 | failed: timed out after 50 s |" in text
    assert "exit status 0, 61 s." in text
    assert "- demo_causalmer: test avg_acc (%) tie 75.0, te 50.0, m 62.5; epoch seconds 3.5, 2.2" in text
    header = next(line for line in text.splitlines() if line.startswith("| layout |"))
    for line in text.splitlines():
        if line.startswith("| iemocap_aligned") or line.startswith("| mosei_unaligned"):
            assert line.count("|") == header.count("|"), line


def test_junit_counts(gpu, tmp_path):
    path = tmp_path / "junit.xml"
    path.write_text('<?xml version="1.0"?><testsuites><testsuite tests="4" failures="1" errors="1" skipped="1">'
                    '<testcase classname="tests.a" name="ok"/><testcase classname="tests.a" name="bad"><failure/></testcase>'
                    '<testcase classname="tests.a" name="err"><error/></testcase>'
                    '<testcase classname="tests.a" name="skip"><skipped/></testcase></testsuite></testsuites>')
    counts = gpu.junit_counts(path)
    assert {k: counts[k] for k in ("tests", "passed", "failures", "errors", "skipped")} == {
        "tests": 4, "passed": 1, "failures": 1, "errors": 1, "skipped": 1}
    assert counts["failed_names"] == ["tests.a::bad", "tests.a::err"]
    assert gpu.junit_counts(tmp_path / "missing.xml") == {}
