"""Nothing silently wrong: every mistake or fault in a run ends in the right result or a clear error.

Runs go through main.main in this process on tiny synthetic files (a few samples, one batch per epoch).
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import main
from tests.helpers import run
from src.data import load_splits, safe_load, write_synthetic
from src.run.rundir import exclusive

TINY = ["--set", "model.backbone_params.d_model=10", "--set", "model.backbone_params.layers=1",
        "--set", "model.branches.text={kind: pool}", "--set", "model.branches.audio={kind: pool}",
        "--set", "model.branches.vision={kind: pool}"]


def train_args(data_dir, runs, name="r", seed=1, epochs=1, *extra):
    return ["train", "--dataset", "iemocap", "--name", name, "--seed", seed, "--data-dir", data_dir,
            "--runs-dir", runs, "--device", "cpu", "--epochs", epochs, *TINY, *extra]


def assert_refused(code, err, *fragments):
    assert code == 2, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, synthetic_data):
    """Runs a and b (one epoch each) of the same config, and the data they were trained on."""
    data_dir = synthetic_data()
    runs = tmp_path_factory.mktemp("runs")
    for name in ("a", "b"):
        assert main.main([str(x) for x in train_args(data_dir, runs, name)]) == 0
    return runs, data_dir


def copy_run(runs: Path, name: str, target: Path) -> Path:
    shutil.copytree(runs / "iemocap" / name, target / "iemocap" / name)
    return target / "iemocap" / name / "seed1"


# ------------------------------------------------------------------------------------------ 1. compare
@pytest.mark.slow
def test_compare_reuses_only_runs_of_the_same_config(capsys, synthetic_data, tmp_path):
    data_dir = synthetic_data()
    common = ["compare", "--dataset", "iemocap", "--seeds", "1", "--data-dir", data_dir, "--runs-dir", tmp_path,
              "--device", "cpu", *TINY]
    code, out, err = run(capsys, *common, "--epochs", "1")
    assert code == 0, err
    metrics = tmp_path / "iemocap" / "compare_mult" / "seed1" / "metrics.json"
    first = metrics.read_text()
    # The same config again: the finished runs are reused, not trained again.
    code, out, err = run(capsys, *common, "--epochs", "1")
    assert code == 0 and "reused" in out
    # Another config: refused before anything is trained, naming the first difference and the way out.
    code, out, err = run(capsys, *common, "--epochs", "2")
    assert_refused(code, err, "train.epochs", "1", "2", "--fresh")
    assert metrics.read_text() == first
    code, out, err = run(capsys, *common, "--epochs", "2", "--fresh")
    assert code == 0, err
    assert len(json.loads(metrics.read_text())["history"]) == 2
    replaced = list((tmp_path / "iemocap" / "compare_mult" / "replaced").iterdir())
    assert len(replaced) == 1 and json.loads((replaced[0] / "metrics.json").read_text()) == json.loads(first)


# ------------------------------------------------------------------------------------ 2. which data
def test_splits_keep_reading_the_data_they_were_loaded_from(tmp_path):
    """A pickle replaced (and its cache rebuilt) after loading does not change what a loaded split reads."""
    path = write_synthetic(tmp_path, "iemocap", scale=0.0005, seed=0)
    expected = np.asarray(safe_load(path)["test"]["text"], dtype=np.float32)
    splits = load_splits(tmp_path, "iemocap")
    write_synthetic(tmp_path, "iemocap", scale=0.0005, seed=1)
    rebuilt = load_splits(tmp_path, "iemocap")
    assert not np.array_equal(rebuilt["test"].get_batch(np.arange(len(expected)))["text"].numpy(), expected)
    read = splits["test"].get_batch(np.arange(len(expected)))["text"].numpy()
    np.testing.assert_array_equal(read, expected)
    assert splits["test"].source["sha1"] != rebuilt["test"].source["sha1"]


def test_metrics_record_the_data_file_and_checkpoints(two_runs):
    runs, data_dir = two_runs
    run_dir = runs / "iemocap" / "a" / "seed1"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    pickle = next(Path(data_dir).glob("*.pkl"))
    assert metrics["data"]["path"] == str(pickle.resolve())
    assert metrics["data"]["size"] == pickle.stat().st_size
    assert metrics["data"]["mtime_ns"] == pickle.stat().st_mtime_ns
    for which in ("best_loss", "best_acc"):
        path = Path(metrics[which]["checkpoint"])
        assert path == run_dir / f"{which}.pt"
        assert torch.load(path, weights_only=True)["epoch"] == metrics[which]["epoch"]


# --------------------------------------------------------------------------------------- 3. one writer
def test_a_second_process_is_refused_while_a_run_holds_the_directory(capsys, synthetic_data, tmp_path):
    run_dir = tmp_path / "iemocap" / "r" / "seed1"
    with exclusive(run_dir):  # as a training run in another process holds it
        code, _, err = run(capsys, *train_args(synthetic_data(), tmp_path))
        assert_refused(code, err, str(run_dir), "in use by another process")
        assert sorted(p.name for p in run_dir.iterdir()) == [".lock"]
    code, _, err = run(capsys, *train_args(synthetic_data(), tmp_path))
    assert code == 0, err


@pytest.mark.slow
def test_two_trainings_of_one_run_started_together(synthetic_data, tmp_path):
    """Two real processes: the second is refused while the first trains, and the first is unharmed."""
    import os
    import subprocess
    import sys
    import time

    args = [sys.executable, "main.py", *map(str, train_args(synthetic_data(), tmp_path, "r", 1, 100000))]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(main.__file__).resolve().parent
    first = subprocess.Popen(args, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        run_dir = tmp_path / "iemocap" / "r" / "seed1"
        deadline = time.time() + 300
        while not (run_dir / "last.pt").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.poll() is None, "the first run ended early"
        second = subprocess.run(args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert_refused(second.returncode, second.stderr, str(run_dir), "in use by another process")
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()


def test_eval_is_refused_while_the_run_is_being_written(capsys, two_runs, tmp_path):
    runs = tmp_path / "runs"
    run_dir = copy_run(two_runs[0], "a", runs)
    with exclusive(run_dir):
        code, _, err = run(capsys, "eval", "--dataset", "iemocap", "--name", "a", "--runs-dir", runs, "--device", "cpu")
    assert_refused(code, err, str(run_dir), "in use by another process")


# ----------------------------------------------------------------------------------------- 4. NaN, inf
@pytest.mark.parametrize("override, key", [("train.lr.backbone=.nan", "train.lr.backbone"),
                                           ("train.lr.text=.inf", "train.lr.text"),
                                           ("model.head.constant=.nan", "model.head.constant"),
                                           ("train.grad_clip_norm=.nan", "train.grad_clip_norm"),
                                           ("model.backbone_params.attn_dropout=-.inf", "model.backbone_params.attn_dropout")])
def test_non_finite_config_values_are_refused(capsys, synthetic_data, tmp_path, override, key):
    code, _, err = run(capsys, *train_args(synthetic_data(), tmp_path), "--set", override)
    assert_refused(code, err, key, "finite")
    assert not (tmp_path / "iemocap").exists()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(capsys, synthetic_data, tmp_path,
                                                                            monkeypatch):
    from src.causal.model import CausalMER

    original, calls = CausalMER.loss_terms, []

    def loss_turning_nan_in_epoch_2(self, out, target):
        terms = original(self, out, target)
        if self.training:
            calls.append(1)
            if len(calls) >= 2:  # one training batch per epoch: the first step of epoch 2
                terms["task_te"] = terms["task_te"] * float("nan")
        return terms

    monkeypatch.setattr(CausalMER, "loss_terms", loss_turning_nan_in_epoch_2)
    code, _, err = run(capsys, *train_args(synthetic_data(), tmp_path, "r", 1, 3))
    assert_refused(code, err, "epoch 2, step 1 of 1", "checkpoints of epoch 1", "train.grad_clip_norm",
                   "--clean-nonfinite", "lower learning rate")
    run_dir = tmp_path / "iemocap" / "r" / "seed1"
    last = torch.load(run_dir / "last.pt", weights_only=True)
    assert last["epoch"] == 1 and all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    assert not (run_dir / "metrics.json").exists()


def test_non_finite_weights_are_not_evaluated(capsys, two_runs, tmp_path):
    runs = tmp_path / "runs"
    run_dir = copy_run(two_runs[0], "a", runs)
    saved = torch.load(run_dir / "best_acc.pt", weights_only=True)
    saved["model"]["head.constant_a"] = torch.full_like(saved["model"]["head.constant_a"], float("nan"))
    torch.save(saved, run_dir / "best_acc.pt")
    code, out, err = run(capsys, "eval", "--dataset", "iemocap", "--name", "a", "--runs-dir", runs, "--device", "cpu")
    assert_refused(code, err, "best_acc.pt", "head.constant_a", "non-finite")
    assert not list(run_dir.glob("eval_*.json"))


# ------------------------------------------------------------------------------------ 5. failed starts
@pytest.mark.parametrize("extra, message", [
    (["--set", "model.backbone_params.no_such_option=1"], "no_such_option"),
    (["--set", "train.weight_decay=-0.1"], "train.weight_decay"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
])
def test_bad_input_is_refused_before_the_run_directory_exists(capsys, synthetic_data, tmp_path, extra, message):
    code, _, err = run(capsys, *train_args(synthetic_data(), tmp_path), *extra)
    assert_refused(code, err, message)
    assert not (tmp_path / "iemocap").exists()


def test_bad_data_is_refused_before_the_run_directory_exists(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "iemocap_data.pkl").write_bytes(b"not a pickle")
    code, _, err = run(capsys, *train_args(tmp_path / "data", tmp_path / "runs"))
    assert_refused(code, err, "iemocap_data.pkl")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("best", [(), ("best_loss.pt",), ("best_loss.pt", "best_acc.pt")])
def test_a_run_that_failed_before_its_first_checkpoint_starts_again(capsys, synthetic_data, tmp_path, best):
    run_dir = tmp_path / "iemocap" / "r" / "seed1"
    run_dir.mkdir(parents=True)
    # What a first epoch killed before it ended leaves (and, killed while saving, its best checkpoints).
    (run_dir / "config.yaml").write_text("dataset: iemocap\n")
    (run_dir / "train.log").write_text("killed\n")
    for name in best:
        (run_dir / name).write_bytes(b"torn")
    code, _, err = run(capsys, *train_args(synthetic_data(), tmp_path))
    assert code == 0, err
    assert (run_dir / "metrics.json").is_file() and "train:" in (run_dir / "config.yaml").read_text()
    code, _, err = run(capsys, *train_args(synthetic_data(), tmp_path))
    assert_refused(code, err, "already holds a run")


def test_resume_reads_the_old_name_of_the_best_score(capsys, two_runs, tmp_path):
    runs = tmp_path / "runs"
    run_dir = copy_run(two_runs[0], "a", runs)
    last = torch.load(run_dir / "last.pt", weights_only=True)
    last["state"]["best_score"] = last["state"].pop("best_acc")
    torch.save(last, run_dir / "last.pt")
    config = run_dir / "config.yaml"  # the run asked for two epochs, and was stopped after one
    config.write_text(config.read_text().replace("epochs: 1\n", "epochs: 2\n"))
    code, _, err = run(capsys, *train_args(two_runs[1], runs, "a", 1, 2), "--resume")
    assert code == 0, err
    assert "best_acc" in torch.load(run_dir / "last.pt", weights_only=True)["state"]


# ------------------------------------------------------------------------------ 6. foreign evaluations
def test_evaluating_another_checkpoint_or_data_keeps_the_runs_own_results(capsys, two_runs, tmp_path):
    runs = tmp_path / "runs"
    run_a = copy_run(two_runs[0], "a", runs)
    run_b = copy_run(two_runs[0], "b", runs)
    evaluate = ["eval", "--dataset", "iemocap", "--name", "a", "--runs-dir", runs, "--device", "cpu"]
    assert run(capsys, *evaluate)[0] == 0
    own = (run_a / "eval_best_acc_test.json").read_text()
    record = json.loads(own)
    assert record["checkpoint"] == {"path": str((run_a / "best_acc.pt").resolve()), "epoch": 1,
                                    "run": json.loads((run_a / "run.json").read_text())}
    assert record["data"]["path"] == str(next(Path(two_runs[1]).glob("*.pkl")).resolve())

    assert run(capsys, *evaluate, "--checkpoint", run_b / "best_acc.pt")[0] == 0
    other_data = tmp_path / "other"
    write_synthetic(other_data, "iemocap", scale=0.0005, seed=5)
    assert run(capsys, *evaluate, "--data-dir", other_data)[0] == 0
    assert (run_a / "eval_best_acc_test.json").read_text() == own
    foreign = sorted(set(run_a.glob("eval_*.json")) - {run_a / "eval_best_acc_test.json"})
    assert len(foreign) == 2
    origins = {(json.loads(p.read_text())["checkpoint"]["path"], json.loads(p.read_text())["data"]["path"])
               for p in foreign}
    assert origins == {(str((run_b / "best_acc.pt").resolve()), record["data"]["path"]),
                       (str((run_a / "best_acc.pt").resolve()), str(next(other_data.glob("*.pkl")).resolve()))}


# --------------------------------------------------------------------------------------------- 10. mixing
def fake_run(run_dir: Path, dataset="iemocap", task="binary", model="backbone", backbone="mult", lr=1e-3):
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        f"dataset: {dataset}\ndata: {{task: {task}, aligned: true}}\nmodel: {{name: {model}, backbone: {backbone}}}\n"
        f"train: {{lr: {{backbone: {lr}}}}}\n")
    (run_dir / "metrics.json").write_text(json.dumps({"best_acc": {"test": {"m": {"avg_acc": 0.5}}}}))
    return run_dir


@pytest.mark.parametrize("second, key", [({"model": "causalmer"}, "model.name"), ({"backbone": "dmd"}, "model.backbone"),
                                         ({"dataset": "mosi", "task": "cls"}, "dataset")])
def test_summarize_refuses_a_group_that_mixes_experiments(capsys, tmp_path, second, key):
    fake_run(tmp_path / "g" / "seed1")
    fake_run(tmp_path / "g" / "seed2", **second)
    code, _, err = run(capsys, "summarize", "--group", f"x={tmp_path / 'g'}")
    assert_refused(code, err, "mixes", key, "seed1", "seed2")


def test_summarize_warns_of_other_differences_and_refuses_a_repeated_label(capsys, tmp_path):
    fake_run(tmp_path / "g" / "seed1")
    fake_run(tmp_path / "g" / "seed2", lr=0.01)
    fake_run(tmp_path / "h" / "seed1", dataset="mosi", task="cls")
    code, out, err = run(capsys, "summarize", "--group", f"x={tmp_path / 'g'}", "--group", f"y={tmp_path / 'h'}")
    assert code == 0, err
    assert "warning: group 'x': train.lr.backbone" in err and "different data" in err
    assert "no paper table: the groups are on tasks ['binary', 'cls']" in out
    code, _, err = run(capsys, "summarize", "--group", f"x={tmp_path / 'g'}", "--group", f"x={tmp_path / 'h'}")
    assert_refused(code, err, "'x' is given twice")


def test_analyze_refuses_runs_of_different_datasets(capsys, tmp_path):
    first = fake_run(tmp_path / "a" / "seed1")
    second = fake_run(tmp_path / "b" / "seed1", dataset="mosi", task="cls")
    code, _, err = run(capsys, "analyze", first, second, "--device", "cpu")
    assert_refused(code, err, "same data", "iemocap", "mosi")


def test_analysis_of_other_data_keeps_the_runs_own_analysis(capsys, two_runs, tmp_path):
    runs = tmp_path / "runs"
    run_a = copy_run(two_runs[0], "a", runs)
    assert run(capsys, "analyze", run_a, "--device", "cpu")[0] == 0
    own = (run_a / "analysis.json").read_text()
    other_data = tmp_path / "other"
    write_synthetic(other_data, "iemocap", scale=0.0005, seed=5)
    assert run(capsys, "analyze", run_a, "--device", "cpu", "--data-dir", other_data)[0] == 0
    assert (run_a / "analysis.json").read_text() == own
    (foreign,) = run_a.glob("analysis_best_acc-*.json")
    (result,) = json.loads(foreign.read_text()).values()
    assert result["data"]["path"] == str(next(other_data.glob("*.pkl")).resolve())
    assert result["checkpoint"] == {"path": str((run_a / "best_acc.pt").resolve()), "epoch": 1,
                                    "run": json.loads((run_a / "run.json").read_text())}
