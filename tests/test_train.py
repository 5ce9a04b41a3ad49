"""End to end through main.py on tiny synthetic data: train, evaluate, resume, remove, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.helpers import copy_run

REPO = Path(__file__).resolve().parents[1]
# A tiny MulT (MulT always uses 10 heads, so d_model 10) and cheap branches keep every run to seconds.
TINY = ["--set", "model.backbone_params.d_model=10", "--set", "model.backbone_params.layers=1",
        "--set", "model.branches.text={kind: pool}", "--set", "model.branches.audio={kind: pool}",
        "--set", "model.branches.vision={kind: pool}", "--set", "train.batch_size=16",
        "--set", "train.eval_batch_size=32"]


def cli(*args, check=True, env=None):
    """Run `python main.py ...` in a fresh process, as a user would."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run([sys.executable, "main.py", *map(str, args)], cwd=REPO, capture_output=True,
                            text=True, env=full_env, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"main.py {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def assert_user_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cli("make-data", "--dataset", "iemocap", "--data-dir", root, "--scale", "0.02", "--seed", "0")
    return root


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """One CausalMER run of 2 epochs shared by the evaluation tests."""
    runs = tmp_path_factory.mktemp("runs")
    cli("train", "--dataset", "iemocap", "--name", "tiny", "--seed", "3", "--data-dir", data_dir,
        "--runs-dir", runs, "--device", "cpu", "--epochs", "2", *TINY)
    return runs / "iemocap" / "tiny" / "seed3"


def test_training_writes_a_complete_run(trained):
    for name in ("config.yaml", "train.log", "metrics.json", "last.pt", "best_loss.pt", "best_acc.pt"):
        assert (trained / name).is_file(), name
    metrics = json.loads((trained / "metrics.json").read_text())
    assert len(metrics["history"]) == 2
    for which in ("best_loss", "best_acc"):
        test = metrics[which]["test"]["predictions"]
        assert set(test) == {"tie", "te", "m"}  # debiased, fused and backbone side by side
        for values in test.values():
            assert 0.0 <= values["avg_acc"] <= 1.0 and "angry_f1" in values
    last = torch.load(trained / "last.pt", weights_only=True)  # tensors only
    assert last["epoch"] == 2 and "head.constant_t" in last["model"]
    assert "epoch 2" in (trained / "train.log").read_text()


def test_eval_prints_all_three_predictions_and_writes_json(trained, data_dir):
    result = cli("eval", "--dataset", "iemocap", "--name", "tiny", "--seed", "3", "--runs-dir",
                 trained.parents[2], "--device", "cpu")
    for label in ("tie", "te", "m", "avg_acc"):
        assert label in result.stdout
    saved = json.loads((trained / "eval_best_acc_test.json").read_text())
    metrics = json.loads((trained / "metrics.json").read_text())
    assert saved["predictions"]["tie"]["avg_acc"] == pytest.approx(metrics["best_acc"]["test"]["predictions"]["tie"]["avg_acc"])


def test_remove_sweep_reports_six_removals_and_drop_std(trained):
    cli("eval", "--dataset", "iemocap", "--name", "tiny", "--seed", "3", "--runs-dir", trained.parents[2],
        "--device", "cpu", "--remove", "sweep")
    report = json.loads((trained / "robustness_best_acc_test.json").read_text())
    assert set(report["removals"]) == {"t", "a", "v", "ta", "tv", "av"}
    tie = report["summary"]["tie"]
    drops = [tie["removals"][r]["drop"] for r in report["removals"]]
    assert tie["drop_std"] == pytest.approx(float(torch.tensor(drops).std(unbiased=False)))
    one = cli("eval", "--dataset", "iemocap", "--name", "tiny", "--seed", "3", "--runs-dir", trained.parents[2],
              "--device", "cpu", "--remove", "a")
    assert "without audio" in one.stdout
    removed = json.loads((trained / "eval_best_acc_test_no_a.json").read_text())
    assert removed["predictions"]["tie"]["avg_acc"] == pytest.approx(tie["removals"]["a"]["score"])


@pytest.mark.parametrize("removal, message", [("tav", "remove at most two"), ("x", "letters t, a, v")])
def test_bad_removal_is_a_user_error(trained, removal, message):
    result = cli("eval", "--dataset", "iemocap", "--name", "tiny", "--seed", "3", "--runs-dir",
                 trained.parents[2], "--device", "cpu", "--remove", removal, check=False)
    assert_user_error(result, message)


@pytest.mark.slow
def test_backbone_alone_uses_the_same_loop_and_seed_repeats_exactly(data_dir, tmp_path):
    args = ["train", "--dataset", "iemocap", "--model", "mult", "--seed", "5", "--data-dir", data_dir,
            "--runs-dir", tmp_path, "--device", "cpu", "--epochs", "2", *TINY]
    cli(*args, "--name", "a")
    cli(*args, "--name", "b")
    first = json.loads((tmp_path / "iemocap" / "a" / "seed5" / "metrics.json").read_text())
    second = json.loads((tmp_path / "iemocap" / "b" / "seed5" / "metrics.json").read_text())
    assert set(first["best_acc"]["test"]["predictions"]) == {"m"}
    assert first["best_acc"]["test"] == second["best_acc"]["test"]
    assert [h["train_loss"] for h in first["history"]] == [h["train_loss"] for h in second["history"]]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(data_dir, tmp_path):
    """Kill a run during a later epoch, resume it, and compare with the uninterrupted run."""
    common = ["--dataset", "iemocap", "--seed", "7", "--data-dir", data_dir, "--device", "cpu",
              "--epochs", "4", *TINY]
    cli("train", *common, "--name", "whole", "--runs-dir", tmp_path)
    run_dir = tmp_path / "iemocap" / "cut" / "seed7"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "main.py", "train", *map(str, common), "--name", "cut",
                             "--runs-dir", str(tmp_path)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (run_dir / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "metrics.json").exists(), "the run finished before it could be killed"
    cli("train", *common, "--name", "cut", "--runs-dir", tmp_path, "--resume")
    whole = json.loads((tmp_path / "iemocap" / "whole" / "seed7" / "metrics.json").read_text())
    cut = json.loads((run_dir / "metrics.json").read_text())
    for which in ("best_loss", "best_acc"):
        assert cut[which]["test"] == whole[which]["test"]
        assert cut[which]["epoch"] == whole[which]["epoch"]
    assert [h["valid_loss"] for h in cut["history"]] == [h["valid_loss"] for h in whole["history"]]


@pytest.mark.slow
def test_distributed_training_and_evaluation_count_every_sample_once(data_dir, tmp_path):
    """Two gloo processes on the CPU: the run trains, and its test scores equal a 1-process evaluation."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                             "--master_port=29533", "main.py", "train", "--dataset", "iemocap", "--name", "ddp",
                             "--seed", "2", "--data-dir", str(data_dir), "--runs-dir", str(tmp_path),
                             "--device", "cpu", "--epochs", "2", *TINY], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "iemocap" / "ddp" / "seed2"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    cli("eval", "--dataset", "iemocap", "--name", "ddp", "--seed", "2", "--runs-dir", tmp_path,
        "--device", "cpu", "--data-dir", data_dir)
    single = json.loads((run_dir / "eval_best_acc_test.json").read_text())
    for name, values in single["predictions"].items():
        for key, value in values.items():
            assert metrics["best_acc"]["test"]["predictions"][name][key] == pytest.approx(value, abs=1e-6)


@pytest.mark.slow
def test_sentiment_tasks_train(tmp_path):
    data = tmp_path / "data"
    cli("make-data", "--dataset", "mosi", "--data-dir", data, "--scale", "0.02")
    runs = tmp_path / "runs"
    base = ["train", "--dataset", "mosi", "--data-dir", data, "--runs-dir", runs, "--device", "cpu",
            "--epochs", "1", *TINY]
    cli(*base, "--name", "cls")
    regression = cli(*base, "--name", "reg", "--task", "regression")
    assert "constants cannot learn" in regression.stdout + regression.stderr
    metrics = json.loads((runs / "mosi" / "cls" / "seed1" / "metrics.json").read_text())
    assert {"acc7", "acc2_pos", "mae", "corr"} <= set(metrics["best_acc"]["test"]["predictions"]["tie"])


# ------------------------------------------------------------------------------------------ bad input
def test_missing_data_says_where_and_how(tmp_path):
    result = cli("train", "--dataset", "iemocap", "--name", "x", "--data-dir", tmp_path / "nowhere",
                 "--runs-dir", tmp_path, "--device", "cpu", check=False)
    assert_user_error(result, "iemocap_data.pkl", "make-data")


def test_unknown_dataset_is_refused():
    result = cli("train", "--dataset", "meld", "--name", "x", check=False)
    assert result.returncode == 2 and "invalid choice: 'meld'" in result.stderr


def test_existing_run_is_never_overwritten(trained, data_dir):
    before = {p.name: p.stat().st_mtime_ns for p in trained.iterdir()}
    result = cli("train", "--dataset", "iemocap", "--name", "tiny", "--seed", "3", "--data-dir", data_dir,
                 "--runs-dir", trained.parents[2], "--device", "cpu", "--epochs", "2", *TINY, check=False)
    assert_user_error(result, "already holds a run", "--resume")
    assert {p.name: p.stat().st_mtime_ns for p in trained.iterdir()} == before


def test_resume_with_another_config_is_refused(trained, data_dir):
    result = cli("train", "--dataset", "iemocap", "--name", "tiny", "--seed", "3", "--data-dir", data_dir,
                 "--runs-dir", trained.parents[2], "--device", "cpu", "--epochs", "2", *TINY,
                 "--set", "model.head.fusion=sum", "--resume", check=False)
    assert_user_error(result, "model.head.fusion", "'mask'", "'sum'")


def test_corrupt_and_foreign_checkpoints_are_refused(trained, tmp_path):
    runs = tmp_path / "runs"
    copy = copy_run(trained, runs)
    (copy / "best_loss.pt").write_bytes((trained / "best_loss.pt").read_bytes()[:1000])
    result = cli("eval", "--dataset", "iemocap", "--name", "tiny", "--seed", "3", "--runs-dir", runs,
                 "--device", "cpu", "--checkpoint", "best_loss", check=False)
    assert_user_error(result, "best_loss.pt", "cannot be read")
    # A checkpoint of another model (different head fusion) in place of best_acc.
    foreign = torch.load(trained / "best_acc.pt", weights_only=True)
    foreign["config"] = foreign["config"].replace("fusion: mask", "fusion: hm")
    torch.save(foreign, copy / "best_acc.pt")
    result = cli("eval", "--dataset", "iemocap", "--name", "tiny", "--seed", "3", "--runs-dir", runs,
                 "--device", "cpu", check=False)
    assert_user_error(result, "different model or config", "model.head.fusion")


def test_eval_of_a_missing_run(tmp_path):
    result = cli("eval", "--dataset", "iemocap", "--name", "ghost", "--runs-dir", tmp_path, "--device", "cpu",
                 check=False)
    assert_user_error(result, "not found")


# ------------------------------------------------------------------------------------- other backbones
SMALL_BACKBONE = {
    "pmr": ["--set", "model.backbone_params.d_model=8", "--set", "model.backbone_params.num_heads=2",
            "--set", "model.backbone_params.layers=1"],
    "dmd": ["--set", "model.backbone_params.d_model=8", "--set", "model.backbone_params.num_heads=2",
            "--set", "model.backbone_params.layers=1", "--set", "train.accumulate=2"],
}
POOL_BRANCHES = TINY[4:10]


@pytest.fixture(scope="module")
def mosei_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("mosei")
    cli("make-data", "--dataset", "mosei_senti", "--data-dir", root, "--scale", "0.002")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["pmr", "dmd"])
def test_other_backbones_train_alone_and_wrapped_through_main(backbone, mosei_dir, tmp_path):
    common = ["--dataset", "mosei_senti", "--data-dir", mosei_dir, "--runs-dir", tmp_path, "--device", "cpu",
              "--epochs", "1", *SMALL_BACKBONE[backbone], *POOL_BRANCHES]
    cli("train", *common, "--model", backbone, "--name", "alone")
    cli("train", *common, "--model", "causalmer", "--backbone", backbone, "--name", "wrapped")
    alone = json.loads((tmp_path / "mosei_senti" / "alone" / "seed1" / "metrics.json").read_text())
    wrapped = json.loads((tmp_path / "mosei_senti" / "wrapped" / "seed1" / "metrics.json").read_text())
    assert set(alone["best_acc"]["test"]["predictions"]) == {"m"}
    assert set(wrapped["best_acc"]["test"]["predictions"]) == {"tie", "te", "m"}
    config = (tmp_path / "mosei_senti" / "wrapped" / "seed1" / "config.yaml").read_text()
    assert f"backbone: {backbone}" in config
    result = cli("eval", "--dataset", "mosei_senti", "--name", "wrapped", "--runs-dir", tmp_path, "--device", "cpu",
                 "--data-dir", mosei_dir)
    assert "acc7" in result.stdout


@pytest.mark.slow
def as_written_before_the_rename(text: str) -> str:
    """A DMD run config as earlier versions wrote it: the depth was `nlevels`."""
    assert text.count("    layers: 1\n") == 1
    return text.replace("    layers: 1\n", "    nlevels: 1\n")


@pytest.mark.slow
def test_an_earlier_dmd_run_with_nlevels_still_evaluates_and_resumes(mosei_dir, tmp_path):
    common = ["--dataset", "mosei_senti", "--data-dir", mosei_dir, "--runs-dir", tmp_path, "--device", "cpu",
              *SMALL_BACKBONE["dmd"], "--model", "dmd", "--name", "old"]
    cli("train", *common, "--epochs", "1")
    run = tmp_path / "mosei_senti" / "old" / "seed1"
    (run / "config.yaml").write_text(as_written_before_the_rename((run / "config.yaml").read_text()))
    for name in ("last.pt", "best_loss.pt", "best_acc.pt"):
        saved = torch.load(run / name, weights_only=True)
        saved["config"] = as_written_before_the_rename(saved["config"])
        torch.save(saved, run / name)
    result = cli("eval", "--dataset", "mosei_senti", "--name", "old", "--runs-dir", tmp_path, "--device", "cpu",
                 "--data-dir", mosei_dir)
    assert "acc7" in result.stdout
    assert "nlevels is deprecated, read as model.backbone_params.layers" in result.stdout
    # --resume compares the whole config with the requested one and loads last.pt: both pass
    (run / "metrics.json").unlink()
    cli("train", *common, "--epochs", "1", "--resume")
    assert len(json.loads((run / "metrics.json").read_text())["history"]) == 1


def test_main_sh_and_inference_sh_pass_their_arguments_through(data_dir, tmp_path):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    train = subprocess.run(["bash", "main.sh", "cpu", "shell", "4", "iemocap", "--data-dir", str(data_dir),
                            "--runs-dir", str(tmp_path), "--epochs", "1", "--model", "mult", *TINY],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    run_dir = tmp_path / "iemocap" / "shell" / "seed4"
    assert "device cpu" in (run_dir / "train.log").read_text()
    evaluation = subprocess.run(["bash", "inference.sh", "cpu", "shell", "4", "iemocap", "--runs-dir", str(tmp_path),
                                 "--checkpoint", "best_loss"], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=600)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "m (backbone)" in evaluation.stdout and (run_dir / "eval_best_loss_test.json").is_file()


# ------------------------------------------------------------------------------- analysis and summaries
def test_analyze_writes_contributions_json_and_pngs(trained, tmp_path):
    out = tmp_path / "analysis"
    result = cli("analyze", trained, "--device", "cpu", "--out", out)
    assert "Shapley contribution" in result.stdout and "NDE share" in result.stdout
    report = json.loads((out / "analysis.json").read_text())
    (run,) = report.values()
    assert run["prediction"] == "tie" and run["metric"] == "avg_acc"
    shapley, subsets = run["shapley"], run["subset_scores"]
    assert len(subsets) == 8
    full, empty = subsets["audio+text+vision"], subsets["none"]
    # Efficiency: the three contributions share out exactly the full-minus-empty difference.
    assert sum(shapley[m] for m in ("text", "audio", "vision")) == pytest.approx(full - empty, abs=1e-9)
    balance = run["shapley_balance"]
    assert 0.0 <= balance <= 1.0 or (balance != balance and not any(shapley.values()))  # NaN iff all zero
    assert run["robustness"]["full_score"] == pytest.approx(full)
    assert set(run["nde_shares"]) == {"text", "audio", "vision"}
    assert sum(run["nde_shares"].values()) == pytest.approx(1.0)
    for png in ("contributions.png", "removal_drops.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_inference_sh_analyze(trained):
    env = {**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", "inference.sh", "cpu", "tiny", "3", "iemocap", "--runs-dir",
                             str(trained.parents[2]), "--analyze"], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Shapley contribution" in result.stdout and (trained / "analysis.json").is_file()


@pytest.mark.slow
def test_compare_trains_both_models_per_seed_and_summarises(data_dir, tmp_path):
    result = cli("compare", "--dataset", "iemocap", "--seeds", "1", "2", "--name", "cmp", "--runs-dir", tmp_path,
                 "--data-dir", data_dir, "--device", "cpu", "--epochs", "1", *TINY)
    for name in ("cmp_mult", "cmp_causalmer_mult"):
        for seed in (1, 2):
            assert (tmp_path / "iemocap" / name / f"seed{seed}" / "metrics.json").is_file()
    csv = (tmp_path / "iemocap" / "cmp_mult_summary.csv").read_text()
    assert "cmp_mult" in csv and "cmp_causalmer_mult" in csv
    assert "±" in result.stdout
    # Running it again finds the finished runs and only summarises.
    again = cli("compare", "--dataset", "iemocap", "--seeds", "1", "2", "--name", "cmp", "--runs-dir", tmp_path,
                "--data-dir", data_dir, "--device", "cpu", "--epochs", "1", *TINY)
    assert "epoch 1 |" not in again.stdout
    summary = cli("summarize", "--group", f"mult={tmp_path / 'iemocap' / 'cmp_mult'}", "--out", tmp_path / "s.csv")
    assert "mult" in summary.stdout and (tmp_path / "s.csv").is_file()


@pytest.mark.slow
def test_demo_trains_both_models_and_compares_them(tmp_path):
    result = cli("demo", "--data-dir", tmp_path / "data", "--runs-dir", tmp_path / "runs", "--epochs", "1")
    assert (tmp_path / "data" / "iemocap_data.pkl").is_file()
    for name in ("demo_mult", "demo_causalmer"):
        assert (tmp_path / "runs" / "iemocap" / name / "seed1" / "best_acc.pt").is_file()
    assert "drop std" in result.stdout and "Shapley contribution" in result.stdout
    assert "MulT alone" in result.stdout.splitlines()[-1] and "debiased (tie)" in result.stdout.splitlines()[-1]


def test_optimizer_state_of_another_parameter_layout_is_a_clear_error(tmp_path):
    from src.errors import CheckpointError
    from src.run.checkpoint import load_optimizer_state

    old_layout = [torch.nn.Parameter(torch.zeros(3)) for _ in range(3)]
    new_layout = [torch.nn.Parameter(torch.zeros(9))]
    saved = torch.optim.Adam(old_layout).state_dict()
    with pytest.raises(CheckpointError, match="last.pt holds optimizer state for another parameter layout"):
        load_optimizer_state(torch.optim.Adam(new_layout), saved, tmp_path / "last.pt")
    same = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3)) for _ in range(3)])
    load_optimizer_state(same, saved, tmp_path / "last.pt")  # the same layout loads
