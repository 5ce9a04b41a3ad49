"""A run is bound to what made it: its data, its training engine, its dataset and its own checkpoints; a run
being trained is never moved; disk faults while training are messages.

Runs go through main.main in this process on tiny synthetic files (one batch per epoch); the trained runs are
made once per module and copied before a test changes anything.
"""
import errno
import json
import os
import shutil
import threading

import pytest
import torch

import main
from src.data import get_spec
from src.data.synthetic import write_synthetic
from src.errors import UserError
from src.run import checkpoint as ckpt_io
from src.run.rundir import exclusive, set_aside
from tests.helpers import copy_run, run
from tests.test_cli_errors import TINY, assert_refused, data_dir  # noqa: F401  (data_dir: a fixture)

FAST = ["--set", "model.backbone_params.engine=fast"]


def train_args(data_dir, runs, *extra, name="tiny", seed=3, epochs=1):
    return ["train", "--dataset", "iemocap", "--name", name, "--seed", seed, "--data-dir", data_dir,
            "--runs-dir", runs, "--device", "cpu", "--epochs", epochs, *TINY, *FAST, *extra]


def eval_args(runs, *extra, name="tiny", seed=3, dataset="iemocap"):
    return ["eval", "--dataset", dataset, "--name", name, "--seed", seed, "--runs-dir", runs, "--device", "cpu",
            *extra]


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """Two finished 1-epoch runs of one config, seeds 3 and 4 (engine fast); tests copy them."""
    runs = tmp_path_factory.mktemp("runs")
    for seed in (3, 4):
        assert main.main([str(a) for a in train_args(data_dir, runs, seed=seed)]) == 0
    return {seed: runs / "iemocap" / "tiny" / f"seed{seed}" for seed in (3, 4)}


@pytest.fixture
def runs(trained, tmp_path):
    """A copy of both runs under a fresh runs folder."""
    copies = tmp_path / "runs"
    for seed, run_dir in trained.items():
        copy_run(run_dir, copies, seed=seed)
    return copies


def own_data(data_dir, tmp_path):
    """A copy of the data, for a test that replaces the file."""
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    return copy


# ------------------------------------------------------------------------------------- moving a run
def test_a_run_in_use_is_not_moved_aside(tmp_path):
    run_dir = tmp_path / "iemocap" / "r" / "seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "last.pt").write_bytes(b"weights")
    with exclusive(run_dir):  # as a training run in another process holds it
        with pytest.raises(UserError, match="in use by another process"):
            set_aside(run_dir)
    assert (run_dir / "last.pt").is_file()
    moved = set_aside(run_dir)
    assert not run_dir.exists() and (moved / "last.pt").read_bytes() == b"weights"
    assert moved.parent == run_dir.parent / "replaced"


def test_compare_fresh_refuses_a_run_that_is_still_training(runs, data_dir, capsys):
    run_dir = runs / "iemocap" / "compare_mult" / "seed3"
    run_dir.parent.mkdir(parents=True)
    (runs / "iemocap" / "tiny" / "seed3").rename(run_dir)
    before = sorted(p.name for p in run_dir.iterdir())
    compare = ["compare", "--dataset", "iemocap", "--seeds", "3", "--data-dir", data_dir, "--runs-dir", runs,
               "--device", "cpu", "--epochs", "2", *TINY, *FAST, "--fresh"]
    with exclusive(run_dir):
        assert_refused(run(capsys, *compare), str(run_dir), "in use by another process")
    assert sorted(p.name for p in run_dir.iterdir()) == before
    assert not (run_dir.parent / "replaced").exists()


# ----------------------------------------------------------------------------------- bound to its data
def test_resume_on_a_replaced_data_file_is_refused(data_dir, tmp_path, capsys):
    data = own_data(data_dir, tmp_path)
    runs = tmp_path / "runs"
    assert run(capsys, *train_args(data, runs))[0] == 0
    run_dir = runs / "iemocap" / "tiny" / "seed3"
    trained_on = json.loads((run_dir / "run.json").read_text())["data"]
    (run_dir / "metrics.json").unlink()  # as if killed after its first epoch
    pickle = write_synthetic(data, "iemocap", scale=0.005, seed=1)  # another file at the same path
    last = (run_dir / "last.pt").read_bytes()
    result = run(capsys, *train_args(data, runs, "--resume"))
    assert_refused(result, "--resume", str(pickle.resolve()), trained_on["sha1"])
    assert (run_dir / "last.pt").read_bytes() == last


def test_eval_on_a_replaced_data_file_says_so_and_keeps_the_runs_own_result(runs, data_dir, tmp_path, capsys):
    run_dir = runs / "iemocap" / "tiny" / "seed3"
    data = own_data(data_dir, tmp_path)  # the same content, so the same data as the run trained on
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace(str(data_dir), str(data)))
    code, out, err = run(capsys, *eval_args(runs))
    assert code == 0 and "other data" not in out, err
    own = run_dir / "eval_best_acc_test.json"
    first = json.loads(own.read_text())
    assert "other_data" not in first

    write_synthetic(data, "iemocap", scale=0.005, seed=1)  # another file at the same path
    code, out, err = run(capsys, *eval_args(runs))
    assert code == 0, err
    notes = [line for line in out.splitlines() if "other data than the run trained on" in line]
    assert len(notes) == 1 and str(data.resolve()) in notes[0]
    assert json.loads(own.read_text()) == first
    (other,) = run_dir.glob("eval_best_acc-*_test.json")
    recorded = json.loads(other.read_text())["other_data"]
    assert recorded["trained_on"]["sha1"] == first["data"]["sha1"] != recorded["evaluated_on"]["sha1"]


def test_a_run_on_a_named_data_file_is_bound_to_that_file(data_dir, tmp_path, capsys):
    named = write_synthetic(tmp_path, "iemocap", scale=0.005, seed=0, path=tmp_path / "named.pkl")
    runs = tmp_path / "runs"
    assert run(capsys, *train_args(data_dir, runs, "--data-file", named))[0] == 0
    run_dir = runs / "iemocap" / "tiny" / "seed3"
    trained_on = json.loads((run_dir / "run.json").read_text())["data"]
    assert trained_on["path"] == str(named.resolve())  # the file trained on, not --data-dir's
    # Every checkpoint records the feature sizes the model reads, so a file of other sizes is refused by name.
    assert ckpt_io.load_checkpoint(run_dir / "best_acc.pt")["feature_dims"] == list(get_spec("iemocap").dims)

    code, out, err = run(capsys, *eval_args(runs, "--data-file", named))
    assert code == 0 and "other data" not in out, err
    assert (run_dir / "eval_best_acc_test.json").is_file()  # its own data: the run's own result
    other = write_synthetic(tmp_path, "iemocap", scale=0.005, seed=1, path=tmp_path / "other.pkl")
    code, out, err = run(capsys, *eval_args(runs, "--data-file", other))
    assert code == 0 and "other data than the run trained on" in out, err
    assert len(list(run_dir.glob("eval_best_acc-*_test.json"))) == 1

    (run_dir / "metrics.json").unlink()  # as if killed after its first epoch
    write_synthetic(tmp_path, "iemocap", scale=0.005, seed=1, path=named)  # another file at the same path
    result = run(capsys, *train_args(data_dir, runs, "--data-file", named, "--resume"))
    assert_refused(result, "--resume", str(named.resolve()), trained_on["sha1"])


# --------------------------------------------------------------------------------- bound to its engine
def test_resume_with_another_engine_is_refused(runs, data_dir, capsys):
    run_dir = runs / "iemocap" / "tiny" / "seed3"
    (run_dir / "metrics.json").unlink()
    result = run(capsys, *train_args(data_dir, runs, "--resume", "--set", "model.backbone_params.engine=plain"))
    assert_refused(result, "model.backbone_params.engine", "'fast'", "'plain'")


def test_resume_where_the_engine_resolves_otherwise_is_refused(runs, data_dir, capsys):
    """run.json records the engine as resolved on the device the run started on; a run started where it
    resolved to plain (auto on a GPU) does not continue with fast (auto on a CPU) unseen."""
    run_dir = runs / "iemocap" / "tiny" / "seed3"
    identity = json.loads((run_dir / "run.json").read_text())
    assert identity["engine"] == "fast"
    (run_dir / "run.json").write_text(json.dumps({**identity, "engine": "plain"}))
    (run_dir / "metrics.json").unlink()
    result = run(capsys, *train_args(data_dir, runs, "--resume"))
    assert_refused(result, "'plain' engine", "'fast'", "kind of device")


def test_compare_does_not_reuse_runs_of_another_engine(data_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    assert run(capsys, *train_args(data_dir, runs, "--model", "mult", name="compare_mult"))[0] == 0  # as compare would
    compare = ["compare", "--dataset", "iemocap", "--seeds", "3", "--data-dir", data_dir, "--runs-dir", runs,
               "--device", "cpu", "--epochs", "1", *TINY, "--backbone", "mult", "--set",
               "model.backbone_params.engine=plain"]
    code, out, err = run(capsys, *compare)
    assert "reused" not in out
    assert_refused((code, out, err), "model.backbone_params.engine", "--fresh")


def test_any_engine_evaluates_any_runs_checkpoint(trained):
    path = trained[3] / "best_acc.pt"
    saved = ckpt_io.load_checkpoint(path)
    cfg = ckpt_io.checkpoint_config(saved)
    assert cfg["model"]["backbone_params"]["engine"] == "fast"
    cfg["model"]["backbone_params"]["engine"] = "plain"
    from src.run.config import model_signature

    ckpt_io.check_compatible(saved, path, model_signature(cfg))  # no error


# -------------------------------------------------------------------------------- bound to its dataset
def test_eval_of_a_run_whose_config_is_of_another_dataset(runs, capsys):
    elsewhere = runs / "mosei_senti" / "tiny"
    elsewhere.parent.mkdir(parents=True)
    (runs / "iemocap" / "tiny").rename(elsewhere)
    code, out, err = run(capsys, *eval_args(runs, dataset="mosei_senti"))
    assert_refused((code, out, err), "'iemocap'", "--dataset mosei_senti")
    assert "test split" not in out


# ----------------------------------------------------------------------------- bound to its checkpoints
def test_a_checkpoint_copied_in_from_another_run_is_not_the_runs_own(runs, capsys):
    a, b = runs / "iemocap" / "tiny" / "seed3", runs / "iemocap" / "tiny" / "seed4"
    shutil.copy(b / "best_acc.pt", a / "best_acc.pt")
    assert_refused(run(capsys, *eval_args(runs)), str(a / "best_acc.pt"), "another run", "seed 4",
                   "--checkpoint FILE")
    assert not (a / "eval_best_acc_test.json").exists()
    # As a foreign checkpoint it is evaluated, into a result file of its own.
    foreign = runs / "b_best_acc.pt"
    (a / "best_acc.pt").rename(foreign)
    code, out, err = run(capsys, *eval_args(runs, "--checkpoint", foreign))
    assert code == 0, err
    (result,) = a.glob("eval_b_best_acc-*_test.json")
    assert json.loads(result.read_text())["checkpoint"]["run"]["seed"] == 4


def test_a_best_checkpoint_swapped_in_while_training_is_not_reported_as_the_runs(runs, data_dir, capsys,
                                                                                 monkeypatch):
    from src.train import loop

    original = loop.final_evaluation

    def swapped(model, splits, cfg, run_dir, *args, **kwargs):  # another run's file lands before the last step
        shutil.copy(runs / "iemocap" / "tiny" / "seed4" / "best_acc.pt", run_dir / "best_acc.pt")
        return original(model, splits, cfg, run_dir, *args, **kwargs)

    monkeypatch.setattr(loop, "final_evaluation", swapped)
    assert_refused(run(capsys, *train_args(data_dir, runs, name="swap")), "another run", "seed 4")
    assert not (runs / "iemocap" / "swap" / "seed3" / "metrics.json").exists()


def test_resume_from_a_last_checkpoint_of_another_run_is_refused(runs, data_dir, capsys):
    a, b = runs / "iemocap" / "tiny" / "seed3", runs / "iemocap" / "tiny" / "seed4"
    shutil.copy(b / "last.pt", a / "last.pt")
    (a / "metrics.json").unlink()
    assert_refused(run(capsys, *train_args(data_dir, runs, "--resume")), str(a / "last.pt"),
                   "another run")


def test_checkpoints_of_earlier_versions_still_evaluate_with_one_warning(runs, capsys):
    a = runs / "iemocap" / "tiny" / "seed3"
    saved = torch.load(a / "best_acc.pt", weights_only=True)
    del saved["run"]
    ckpt_io.atomic_save(saved, a / "best_acc.pt")
    (a / "run.json").unlink()
    code, out, err = run(capsys, *eval_args(runs, "--analyze"))  # reads the checkpoint twice
    assert code == 0, err
    assert out.count("does not record its run") == 1, out
    assert out.count("has no run.json") == 1, out


# ------------------------------------------------------------------------------------ disk faults
def test_a_tensorboard_path_that_is_a_file_is_refused_before_anything_is_written(data_dir, tmp_path, capsys):
    run_dir = tmp_path / "iemocap" / "tiny" / "seed3"
    run_dir.mkdir(parents=True)  # left by a first attempt that failed before its first epoch
    (run_dir / "tensorboard").write_text("not a folder")
    assert_refused(run(capsys, *train_args(data_dir, tmp_path, "--logger", "tensorboard")),
                   str(run_dir / "tensorboard"), "--logger none")
    assert sorted(p.name for p in run_dir.iterdir()) == ["tensorboard"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_tensorboard_folder_is_refused(data_dir, tmp_path, capsys):
    folder = tmp_path / "iemocap" / "tiny" / "seed3" / "tensorboard"
    folder.mkdir(parents=True)
    folder.chmod(0o500)
    try:
        assert_refused(run(capsys, *train_args(data_dir, tmp_path, "--logger", "tensorboard")), "not writable")
    finally:
        folder.chmod(0o700)


def record_sizes(path):
    """The byte length of each complete TFRecord in an events file; raises if the file ends inside one."""
    data, sizes, at = path.read_bytes(), [], 0
    while at < len(data):
        length = int.from_bytes(data[at:at + 8], "little")
        size = 8 + 4 + length + 4
        assert at + size <= len(data), f"torn record at byte {at} of {len(data)}"
        sizes.append(size)
        at += size
    return sizes


def test_a_full_disk_while_writing_tensorboard_events(data_dir, tmp_path, capsys, monkeypatch):
    """The disk fills after the writer's first record: half of the next one is written, then ENOSPC."""
    from tensorboard.summary.writer import record_writer

    real_write, calls = record_writer.RecordWriter.write, []

    def filling(self, data):
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(self, data)
        self._writer.write(data[:len(data) // 2])
        self._writer.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(record_writer.RecordWriter, "write", filling)
    printed = []  # what Python would print as a thread's traceback
    monkeypatch.setattr(threading, "excepthook", printed.append)
    result = run(capsys, *train_args(data_dir, tmp_path, "--logger", "tensorboard"))
    assert_refused(result, "TensorBoard", "no space left", "--resume")
    assert printed == []
    run_dir = tmp_path / "iemocap" / "tiny" / "seed3"
    (events,) = (run_dir / "tensorboard").glob("events.out.tfevents.*")
    assert len(record_sizes(events)) == 1  # the first record, whole; nothing of the torn one
    assert (run_dir / "last.pt").is_file()
