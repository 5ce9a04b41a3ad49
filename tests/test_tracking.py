"""Watching a run: the TensorBoard logger, curves.png, confusion PNGs from eval, attention maps and
report.md from analyze, end to end through main.py on tiny synthetic data."""
import json
import re
import math
import sys

import numpy as np
import pytest

from src.analysis.attention import CROSSMODAL_NAMES
from src.analysis.plots import plot_curves
from src.errors import ConfigError, UserError
from src.models.encoder import future_mask
from src.train import tracking
from src.run.config import load_config
from tests.test_train import TINY, assert_user_error, cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ENTRY = {"epoch": 3, "train_loss": 2.5, "valid_loss": 2.0, "valid_avg_acc": 0.7, "lr": 1e-3, "seconds": 4.0,
         "train_terms": {"task_te": 0.1, "kl": 2.4}, "valid_scores": {"avg_acc": {"tie": 0.7, "te": 0.6, "m": 0.5}},
         "lrs": {"backbone": 1e-3, "constant_t": 2e-3}, "samples_per_second": 100.0,
         "constants": {"c_t": 0.1, "c_a": 0.2, "c_v": 0.3},
         "margins": {"text": 0.5, "audio": 0.4, "vision": 0.3, "te": 2.0, "tie_te_flip_rate": 0.01}}


def test_epoch_scalars_name_every_logged_value():
    scalars = tracking.epoch_scalars(ENTRY)
    assert scalars == {
        "train/loss": 2.5, "valid/loss": 2.0, "train/task_te": 0.1, "train/kl": 2.4,
        "valid/avg_acc/tie": 0.7, "valid/avg_acc/te": 0.6, "valid/avg_acc/m": 0.5,
        "lr/backbone": 1e-3, "lr/constant_t": 2e-3, "constant/c_t": 0.1, "constant/c_a": 0.2, "constant/c_v": 0.3,
        "margin/text": 0.5, "margin/audio": 0.4, "margin/vision": 0.3, "margin/te": 2.0,
        "margin/tie_te_flip_rate": 0.01, "time/epoch_seconds": 4.0, "time/samples_per_second": 100.0}


def test_flat_hparams_keeps_scalars_and_writes_the_rest_as_text():
    flat = tracking.flat_hparams({"a": {"b": 1, "c": None, "d": [1, 2]}, "e": "x", "f": True})
    assert flat == {"a.b": 1, "a.c": "None", "a.d": "[1, 2]", "e": "x", "f": True}


def test_the_logger_is_chosen_once_and_only_rank_0_writes(tmp_path):
    assert isinstance(tracking.make_logger("none", tmp_path, True), tracking.NullLogger)
    assert isinstance(tracking.make_logger("tensorboard", tmp_path, False), tracking.NullLogger)
    assert not (tmp_path / "tensorboard").exists()
    logger = tracking.make_logger("tensorboard", tmp_path, True)
    logger.close()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    with pytest.raises(ConfigError, match="train.logger 'mlflow'.*none, tensorboard, wandb"):
        tracking.make_logger("mlflow", tmp_path, True)


def test_missing_tensorboard_is_a_user_error_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` now fails
    with pytest.raises(UserError, match=r"pip install -e \.\[tensorboard\]"):
        tracking.make_logger("tensorboard", tmp_path, True)


class FakeWandb:
    """A stand-in for the wandb package that records what a run is given (the real one is an optional extra)."""

    def __init__(self):
        self.calls, self.logged, self.summary, self.finished = [], [], {}, False

    def init(self, **kwargs):
        self.calls.append(kwargs)
        return self

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_wandb_gets_the_tensorboard_scalars_offline_in_the_run(tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    run_dir = tmp_path / "iemocap" / "w" / "seed1"
    logger = tracking.make_logger("wandb", run_dir, True, cfg={"train": {"epochs": 2}})
    (init,) = fake.calls
    assert init["mode"] == "offline" and init["dir"] == str(run_dir / "wandb") and (run_dir / "wandb").is_dir()
    assert init["id"] == "iemocap-w-seed1" and init["config"] == {"train.epochs": 2}
    logger.log_epoch(ENTRY)
    assert fake.logged == [(3, tracking.epoch_scalars(ENTRY))]
    results = {which: {"epoch": 1, "test": {"loss": 0.5, "predictions": {"tie": {"avg_acc": 0.8}}}}
               for which in tracking.CHECKPOINTS}
    logger.log_final(results, {}, "avg_acc")
    assert fake.summary == {tag: value for tag, value, _ in tracking.final_scalars(results)}
    logger.close()
    assert fake.finished
    assert isinstance(tracking.make_logger("wandb", run_dir, False), tracking.NullLogger)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(UserError, match=r"pip install -e \.\[wandb\]"):
        tracking.make_logger("wandb", run_dir, True)


def test_config_knows_the_logger_key():
    assert load_config("iemocap")["train"]["logger"] == "none"
    assert load_config("mosi", overrides=["train.logger=tensorboard"])["train"]["logger"] == "tensorboard"
    with pytest.raises(ConfigError, match="train.logger 'tb'"):
        load_config("iemocap", overrides=["train.logger=tb"])


def test_curves_of_a_backbone_alone_and_of_an_older_history(tmp_path):
    entry = {k: v for k, v in ENTRY.items() if k not in ("constants", "margins")}
    assert plot_curves([entry, {**entry, "epoch": 4}], tmp_path / "a.png", "avg_acc").read_bytes()[:8] == PNG_MAGIC
    old = {k: ENTRY[k] for k in ("epoch", "train_loss", "valid_loss", "valid_avg_acc", "lr", "seconds")}
    assert plot_curves([old], tmp_path / "b.png", "avg_acc").read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(ValueError):
        plot_curves([], tmp_path / "c.png", "avg_acc")


# --- end to end ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def watched(tmp_path_factory):
    """A 2-epoch CausalMER run with --logger tensorboard, evaluated and analysed with --attention."""
    root = tmp_path_factory.mktemp("watched")
    data = root / "data"
    cli("make-data", "--dataset", "iemocap", "--data-dir", data, "--scale", "0.02", "--seed", "0")
    cli("train", "--dataset", "iemocap", "--name", "tb", "--seed", "2", "--data-dir", data, "--runs-dir", root / "runs",
        "--device", "cpu", "--epochs", "2", "--logger", "tensorboard", *TINY)
    run = root / "runs" / "iemocap" / "tb" / "seed2"
    cli("eval", "--dataset", "iemocap", "--name", "tb", "--seed", "2", "--runs-dir", root / "runs", "--device", "cpu")
    analyzed = cli("analyze", run, "--device", "cpu", "--attention")
    return {"run": run, "data": data, "analyze_stdout": analyzed.stdout}


def scalars(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events, {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.mark.slow
def test_event_files_hold_the_epoch_and_final_scalars(watched):
    run = watched["run"]
    metrics = json.loads((run / "metrics.json").read_text())
    history = metrics["history"]
    events, logged = scalars(run)
    expected = {"train/loss", "valid/loss", "train/task_te", "train/task_text", "train/task_audio",
                "train/task_vision", "train/kl", "valid/avg_acc/tie", "valid/avg_acc/te", "valid/avg_acc/m",
                "lr/backbone", "lr/text", "lr/audio", "lr/vision", "lr/constant_t", "lr/constant_a",
                "lr/constant_v", "constant/c_t", "constant/c_a", "constant/c_v", "margin/text", "margin/audio",
                "margin/vision", "margin/te", "margin/tie_te_flip_rate", "time/epoch_seconds",
                "time/samples_per_second"}
    assert expected <= set(logged)
    for tag in expected:
        assert [step for step, _ in logged[tag]] == [1, 2], tag
    # Every epoch scalar is the history's value (TensorBoard stores float32).
    for entry in history:
        for tag, value in tracking.epoch_scalars(entry).items():
            assert logged[tag][entry["epoch"] - 1][1] == pytest.approx(value, rel=1e-6, abs=1e-7), tag
    assert [v for _, v in logged["valid/loss"]] == pytest.approx([h["valid_loss"] for h in history], rel=1e-6)
    # The parts add up to the training loss.
    for entry in history:
        assert sum(entry["train_terms"].values()) == pytest.approx(entry["train_loss"], rel=1e-5)
    for which in ("best_loss", "best_acc"):
        entry = metrics[which]
        for prediction, values in entry["test"]["predictions"].items():
            for metric, value in values.items():
                assert logged[f"test/{which}/{prediction}/{metric}"] == [(entry["epoch"], pytest.approx(value))]
        assert logged[f"hparam/{which}/tie_avg_acc"][0][1] == pytest.approx(entry["test"]["predictions"]["tie"]["avg_acc"])
    assert "_hparams_/experiment" in events.summary_metadata


@pytest.mark.slow
def test_curves_confusion_attention_and_report_are_written(watched):
    run = watched["run"]
    for name in ("curves.png", "confusion_best_acc_test.png", "attention_best_acc_test.png"):
        assert (run / name).read_bytes()[:8] == PNG_MAGIC, name
    saved = json.loads((run / "eval_best_acc_test.json").read_text())
    for prediction, counts in saved["confusion"].items():
        counts = np.array(counts)
        assert counts.shape == (4, 2, 2)
        n = counts[0].sum()
        assert np.trace(counts[3]) / n == pytest.approx(saved["predictions"][prediction]["angry_acc"])
    with np.load(run / "attention_best_acc_test.npz") as maps:
        assert sorted(maps.files) == sorted(CROSSMODAL_NAMES)
        for name in CROSSMODAL_NAMES:
            weights = maps[name]
            # aligned IEMOCAP, kernels (3, 5, 3): 18 text, 16 audio and 18 vision steps
            lengths = {"l": 18, "a": 16, "v": 18}
            assert weights.shape == (lengths[name[6]], lengths[name[-1]])
            # Padded steps are left out: each cell is a mean over the samples where both its steps are
            # real (so rows need not sum to 1), nan where none is.
            real = np.isfinite(weights)
            assert real.any() and ((weights[real] >= 0) & (weights[real] <= 1 + 1e-6)).all()
            blocked = np.isinf(future_mask(*weights.shape, "cpu").numpy())
            real = np.isfinite(weights)
            assert (weights[blocked & real] == 0).all() and (weights[~blocked & real] > 0).all()
    report = (run / "report.md").read_text()
    for fragment in ("| avg_acc |", "Shapley contribution", "](curves.png)", "](confusion_best_acc_test.png)",
                     "](attention_best_acc_test.png)", "](contributions.png)", "](removal_drops.png)"):
        assert fragment in report, fragment
    assert "wrote " + str(run / "report.md") in watched["analyze_stdout"]


@pytest.mark.slow
def test_attention_of_one_sample_and_bad_flags(watched):
    run = watched["run"]
    cli("analyze", run, "--device", "cpu", "--attention", "--sample", "1")
    with np.load(run / "attention_best_acc_test_sample1.npz") as maps:
        assert (np.nansum(maps["trans_a_with_v"], -1) <= 1 + 1e-6).all()
    with np.load(run / "attention_best_acc_test.npz") as mean:
        assert not np.allclose(maps_of(run, "_sample1")["trans_a_with_v"], mean["trans_a_with_v"], equal_nan=True)
    assert_user_error(cli("analyze", run, "--device", "cpu", "--attention", "--sample", "999", check=False),
                      "--sample 999")
    assert_user_error(cli("analyze", run, "--device", "cpu", "--sample", "1", check=False), "needs --attention")


@pytest.mark.slow
def test_analyze_out_holds_everything_with_relative_links(watched, tmp_path):
    run = watched["run"]
    before = sorted(p.name for p in run.iterdir())
    out = tmp_path / "figures"
    cli("analyze", run, "--device", "cpu", "--attention", "--out", out, "--label", "CausalMER",
        "--figure-format", "svg")
    assert sorted(p.name for p in run.iterdir()) == before  # nothing written into the run
    for name in ("attention_tb_seed2_best_acc_test.npz", "attention_tb_seed2_best_acc_test.svg",
                 "contributions.svg", "removal_drops.svg", "analysis.json", "report.md"):
        assert (out / name).is_file(), name
    assert (out / "contributions.svg").read_text().lstrip().startswith("<?xml")
    report = (out / "report.md").read_text()
    assert "](attention_tb_seed2_best_acc_test.svg)" in report and "](contributions.svg)" in report
    # The run's own pictures are copied in: the folder stands alone, every link stays inside it.
    assert "](tb_seed2_curves.png)" in report and (out / "tb_seed2_curves.png").read_bytes()[:8] == PNG_MAGIC
    assert all(not link.startswith(("/", "..")) for link in re.findall(r"\]\(([^)]+)\)", report))


def maps_of(run, suffix):
    with np.load(run / f"attention_best_acc_test{suffix}.npz") as maps:
        return {name: maps[name] for name in maps.files}


@pytest.mark.slow
def test_logger_without_tensorboard_installed_is_exit_2(watched, tmp_path):
    blocker = tmp_path / "blocker" / "tensorboard"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named tensorboard')\n")
    result = cli("train", "--dataset", "iemocap", "--name", "no_tb", "--seed", "1", "--data-dir", watched["data"],
                 "--runs-dir", tmp_path / "runs", "--device", "cpu", "--epochs", "1", "--logger", "tensorboard",
                 *TINY, check=False, env={"PYTHONPATH": str(blocker.parent)})
    assert_user_error(result, "tensorboard extra", "pip install -e .[tensorboard]")
    assert not (tmp_path / "runs" / "iemocap" / "no_tb").exists()  # refused before anything is written


def test_a_resumed_run_replaces_the_events_of_the_interrupted_epochs(tmp_path):
    first = tracking.make_logger("tensorboard", tmp_path, True)
    for epoch in (1, 2, 3):  # epoch 3 was logged, but the run died before its last.pt
        first.log_epoch({**ENTRY, "epoch": epoch, "valid_loss": float(epoch)})
    first.close()
    resumed = tracking.make_logger("tensorboard", tmp_path, True, first_epoch=3)
    for epoch in (3, 4):
        resumed.log_epoch({**ENTRY, "epoch": epoch, "valid_loss": 10.0 * epoch})
    resumed.close()
    _, logged = scalars(tmp_path)
    assert logged["valid/loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]
