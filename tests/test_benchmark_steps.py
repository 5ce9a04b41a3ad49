"""Every training step a benchmark times is the trainer's own `src.train.loop.train_step`, given the
module as training runs it (compiled or not) and the --amp flag: speed.py's model and variant rows,
gpu.py's CUDA rows (built by its row builder, measured here on the CPU) and engines.py."""
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from src.run import build
from src.train import loop
from tests.helpers import benchmark_module

REPO = Path(__file__).resolve().parents[1]
# One untimed and one timed step (and evaluation batch) per row.
POLICY = dict(warmup=1, min_repeats=1, max_repeats=1, budget_s=0.0,
              eval_warmup=1, eval_min_repeats=1, eval_max_repeats=1, eval_budget_s=0.0)
SETTINGS = {"device": "cpu", "optimizer": "trainer", "policy": POLICY}


class Compiled(nn.Module):
    """Stands in for torch.compile's wrapper (tracing MulT costs seconds): what a compiled row's steps
    must be given instead of the module."""

    def __init__(self, model):
        super().__init__()
        self._orig_mod = model

    def forward(self, *inputs):
        return self._orig_mod(*inputs)

    def __getattr__(self, name):  # as torch.compile's wrapper: the module's own attributes show through
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._orig_mod, name)


@pytest.fixture
def steps(monkeypatch):
    """The calls of train_step from here on: the class of the module each was given, and its amp flag."""
    calls = []
    real = loop.train_step

    def counting(model, optimizer, batch, tcfg, device, amp=False, **options):
        calls.append((type(model).__name__, amp))
        return real(model, optimizer, batch, tcfg, device, amp, **options)

    monkeypatch.setattr(loop, "train_step", counting)
    monkeypatch.setattr(build, "compile_model", lambda model, backend="inductor": Compiled(model))
    return calls


def expected_calls(row: dict, result: dict) -> list:
    """A row's steps: a variant row's first (compiling) call, the warm-up step, the timed ones."""
    module = "Compiled" if row.get("compile") else result["module"]
    first = 1 if "variant" in row else 0
    return [(module, row.get("amp", False))] * (first + POLICY["warmup"] + result["train_repeats"])


def test_speed_rows_time_train_step(steps):
    speed = benchmark_module("speed")
    rows = [row for row in speed.compile_rows() if not row["full_only"]]  # eager and compiled MulT
    rows.append(speed.group_rows("pmr")[0])  # a plain model row
    rows = [speed.shrink_for_quick(row) for row in rows]
    results = speed.child_rows({"rows": rows, "settings": {**SETTINGS, "threads": torch.get_num_threads()}})
    want = []
    for row in rows:
        assert "error" not in results[row["name"]], results[row["name"]]
        want += expected_calls(row, results[row["name"]])
    assert steps == want
    assert [results[row["name"]]["module"] for row in rows] == ["BackboneOnly", "Compiled", "BackboneOnly"]


def test_gpu_rows_time_train_step(steps, capsys):
    gpu = benchmark_module("gpu")
    rows = [benchmark_module("speed").shrink_for_quick(row) for chunk in gpu.speed_rows() for row in chunk
            if row["layout"] == "iemocap_aligned"]
    assert {(row["compile"], row["amp"]) for row in rows} == {(c, a) for c in (False, True) for a in (False, True)}
    gpu.child({"rows": rows, "settings": SETTINGS})
    results = {entry["name"]: entry["result"] for entry in map(json.loads, capsys.readouterr().out.splitlines())}
    want = []
    for row in rows:
        assert "error" not in results[row["name"]], results[row["name"]]
        want += expected_calls(row, results[row["name"]])
    assert steps == want


def test_engines_time_train_step(steps, tmp_path):
    engines = benchmark_module("engines")
    engines.main(["--batch", "1", "--rounds", "1", "--output", str(tmp_path / "engines.json")])
    assert steps == [("BackboneOnly", False)] * 4  # two engines, a warm-up round and a timed one


def test_no_benchmark_runs_a_backward_of_its_own():
    for script in (REPO / "benchmarks").glob("*.py"):
        assert ".backward(" not in script.read_text(), f"{script.name}: time train_step instead"
