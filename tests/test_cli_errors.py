"""Every mistake through the command line ends in one paragraph on stderr and exit code 2, never a traceback.

The commands run in this process (main.main) on tiny synthetic files, so each case takes well under a second
once the shared run exists; an exception that escaped would fail the test with its traceback.
"""
import os
import pickle
import subprocess
import sys

import pytest
import torch
import yaml

import main
from tests.helpers import copy_run, run
from src.data.synthetic import write_synthetic

TINY = ["--set", "model.backbone_params.d_model=10", "--set", "model.backbone_params.layers=1",
        "--set", "model.branches.text={kind: pool}", "--set", "model.branches.audio={kind: pool}",
        "--set", "model.branches.vision={kind: pool}", "--set", "train.batch_size=16",
        "--set", "train.eval_batch_size=32"]


def assert_refused(result, *fragments):
    code, out, err = result
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_synthetic(root, "iemocap", scale=0.005, seed=0)
    return root


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A finished 1-epoch run; tests copy it before damaging anything."""
    runs = tmp_path_factory.mktemp("runs")
    assert main.main(["train", "--dataset", "iemocap", "--name", "tiny", "--seed", "3", "--data-dir", str(data_dir),
                      "--runs-dir", str(runs), "--device", "cpu", "--epochs", "1", *TINY]) == 0
    return runs / "iemocap" / "tiny" / "seed3"


@pytest.fixture
def run_copy(trained, tmp_path):
    runs = tmp_path / "runs"
    return runs, copy_run(trained, runs)


def train_args(data_dir, runs, *extra, name="x"):
    return ["train", "--dataset", "iemocap", "--name", name, "--data-dir", data_dir, "--runs-dir", runs,
            "--device", "cpu", "--epochs", "1", *TINY, *extra]


def eval_args(runs, *extra):
    return ["eval", "--dataset", "iemocap", "--name", "tiny", "--seed", "3", "--runs-dir", runs, "--device", "cpu",
            *extra]


# ---------------------------------------------------------------------------------------------------- data
def test_zero_length_sequences(tmp_path, capsys):
    path = write_synthetic(tmp_path, "iemocap", scale=0.0005)
    data = pickle.loads(path.read_bytes())
    for split in data.values():
        split["audio"] = split["audio"][:, :0]
    path.write_bytes(pickle.dumps(data, protocol=4))
    assert_refused(run(capsys, *train_args(tmp_path, tmp_path / "runs")), "audio", "length 0")


# -------------------------------------------------------------------------------------------- where runs go
def test_runs_dir_that_is_a_file(data_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.write_text("not a folder")
    assert_refused(run(capsys, *train_args(data_dir, runs)), "cannot create the run directory", str(runs))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_runs_dir(data_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    runs.mkdir()
    runs.chmod(0o500)
    try:
        assert_refused(run(capsys, *train_args(data_dir, runs)), "cannot create the run directory")
    finally:
        runs.chmod(0o700)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, whose writes fail with ENOSPC")
def test_full_disk_while_saving_a_checkpoint(data_dir, tmp_path, capsys):
    """A real ENOSPC from the kernel: the checkpoint's temporary file is a link to /dev/full."""
    run_dir = tmp_path / "iemocap" / "x" / "seed1"
    run_dir.mkdir(parents=True)  # as a first attempt that failed before its first epoch left it
    (run_dir / f".best_loss.pt.{os.getpid()}.tmp").symlink_to("/dev/full")
    result = run(capsys, *train_args(data_dir, tmp_path))
    assert_refused(result, "no space left", "best_loss.pt")
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name]
    assert not (run_dir / "best_loss.pt").exists()
    assert os.path.exists("/dev/full")  # only the link was removed


@pytest.mark.parametrize("name", ["../../x", "/tmp/elsewhere", "a/b", "..", ""])
def test_run_names_that_leave_the_runs_dir(data_dir, tmp_path, capsys, name):
    assert_refused(run(capsys, *train_args(data_dir, tmp_path, name=name)), "plain folder name")
    assert not (tmp_path / "x").exists() and not any(tmp_path.iterdir())


# ---------------------------------------------------------------------------------------- flags and configs
@pytest.mark.parametrize("extra, fragment", [
    (["--set", "model.backbone=[1]"], "model.backbone"),
    (["--set", "train.weight_decay=-0.01"], "train.weight_decay must be non-negative"),
    (["--set", "train.early_stop=0"], "train.early_stop must be at least 1"),
    (["--set", "train.plateau.patience=-1"], "train.plateau.patience"),
    (["--set", "loss.alpha=-1"], "loss.alpha must be non-negative"),
    (["--set", "model.backbone_params.attn_dropout=1.5"], "model.backbone_params.attn_dropout must be in [0, 1)"),
    (["--set", "model.backbone_params.relu_dropout=-0.5"], "model.backbone_params.relu_dropout must be in [0, 1)"),
    (["--set", "model.backbone_params.d_model=7"], "d_model (7) must be a multiple of model.backbone_params.num_heads"),
    (["--set", "model.backbone_params.d_model=-10"], "model.backbone_params.d_model must be at least 1"),
    (["--set", "model.backbone_params.layers=0"], "model.backbone_params.layers must be at least 1"),
    (["--set", "model.backbone_params.kernel_sizes=[30, 3, 3]"], "the text kernel size 30 is longer than the text "
                                                                 "sequences of the data"),
    (["--set", "dataset=mosi"], "--set dataset=mosi contradicts --dataset, which gives dataset = iemocap"),
    (["--epochs", "2", "--set", "train.epochs=3"], "--set train.epochs=3 contradicts"),
    (["--name", "n" * 300], "300 bytes long"),
    (["--device", "foo"], "--device 'foo'"),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_bad_flags_and_values_before_the_run_directory_exists(data_dir, tmp_path, capsys, extra, fragment):
    assert_refused(run(capsys, *train_args(data_dir, tmp_path, *extra)), fragment)
    assert not (tmp_path / "iemocap").exists()


def test_a_config_file_lacking_a_section(data_dir, tmp_path, capsys):
    cfg = yaml.safe_load((main.Path(main.__file__).parent / "configs" / "iemocap.yaml").read_text())
    del cfg["loss"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert_refused(run(capsys, *train_args(data_dir, tmp_path / "runs", "--config", tmp_path / "c.yaml")),
                   "missing required key 'loss.alpha'")


@pytest.mark.parametrize("content, fragment", [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not a UTF-8 text file"),
    (b"a0: &a0 [" + b", ".join([b"lol"] * 9) + b"]\n" + b"".join(
        b"a%d: &a%d [" % (i, i) + b", ".join([b"*a%d" % (i - 1)] * 9) + b"]\n" for i in range(1, 9)),
     "aliases expand to more than"),
    (b"dataset: iemocap\ndataset: iemocap\n", "the key 'dataset' is given twice"),
])
def test_a_config_file_that_is_no_config(data_dir, tmp_path, capsys, content, fragment):
    (tmp_path / "c.yaml").write_bytes(content)
    assert_refused(run(capsys, *train_args(data_dir, tmp_path / "runs", "--config", tmp_path / "c.yaml")),
                   str(tmp_path / "c.yaml"), fragment)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("seed", ["-1", str(2**32), "1.5"])
def test_seeds_outside_numpys_range(data_dir, tmp_path, capsys, seed):
    assert_refused(run(capsys, *train_args(data_dir, tmp_path, "--seed", seed)), "--seed")


def test_the_largest_seed_is_accepted():
    assert main.seed_value(str(2**32 - 1)) == 2**32 - 1 and main.seed_value("0") == 0


@pytest.mark.parametrize("env, fragment", [({"WORLD_SIZE": "2"}, "RANK is not"),
                                           ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two'"),
                                           ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK=5 is not below")])
def test_distributed_environment_without_a_rank(data_dir, tmp_path, capsys, monkeypatch, env, fragment):
    monkeypatch.delenv("RANK", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert_refused(run(capsys, *train_args(data_dir, tmp_path)), fragment)


def test_amp_on_the_cpu_says_it_does_nothing(run_copy, capsys):
    runs, _ = run_copy
    code, out, _ = run(capsys, *eval_args(runs, "--amp"))
    assert code == 0
    assert out.count("--amp has no effect") == 1, out
    code, out, _ = run(capsys, *eval_args(runs))
    assert code == 0 and "--amp" not in out


# ------------------------------------------------------------------------------------- checkpoints and runs
@pytest.mark.parametrize("which", ["best_acc.pt", "last.pt"])
def test_empty_checkpoints(run_copy, data_dir, capsys, which):
    runs, copy = run_copy
    (copy / which).write_bytes(b"")
    if which == "last.pt":
        result = run(capsys, "train", "--dataset", "iemocap", "--name", "tiny", "--seed", "3", "--data-dir",
                     data_dir, "--runs-dir", runs, "--device", "cpu", "--epochs", "1", *TINY, "--resume")
    else:
        result = run(capsys, *eval_args(runs))
    assert_refused(result, str(copy / which), "empty")


@pytest.mark.parametrize("damage, fragment", [
    (lambda c: {**c, "model": [1]}, "'model' is of type list"),
    (lambda c: {**c, "config": 7}, "'config' is of type int"),
    (lambda c: {k: v for k, v in c.items() if k != "epoch"}, "'epoch' is missing"),
])
def test_crafted_checkpoint_dicts(run_copy, capsys, damage, fragment):
    runs, copy = run_copy
    torch.save(damage(torch.load(copy / "best_acc.pt", weights_only=True)), copy / "best_acc.pt")
    assert_refused(run(capsys, *eval_args(runs)), "best_acc.pt", fragment)


def test_one_flipped_byte_in_a_checkpoint(run_copy, capsys):
    runs, copy = run_copy
    raw = bytearray((copy / "best_acc.pt").read_bytes())
    raw[len(raw) // 2] ^= 0x10
    (copy / "best_acc.pt").write_bytes(bytes(raw))
    assert_refused(run(capsys, *eval_args(runs)), "best_acc.pt")


def test_a_run_config_that_is_a_list(run_copy, capsys):
    runs, copy = run_copy
    (copy / "config.yaml").write_text("- 1\n- 2\n")
    assert_refused(run(capsys, *eval_args(runs)), "config.yaml", "holds a list")


def test_an_old_run_config_with_num_workers_still_evaluates_and_resumes(run_copy, data_dir, capsys):
    runs, copy = run_copy
    cfg = yaml.safe_load((copy / "config.yaml").read_text())
    cfg["train"]["num_workers"] = 0  # what configs held before the key was retired
    (copy / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert run(capsys, *eval_args(runs))[0] == 0
    code, out, err = run(capsys, "train", "--dataset", "iemocap", "--name", "tiny", "--seed", "3", "--data-dir",
                         data_dir, "--runs-dir", runs, "--device", "cpu", "--epochs", "1", *TINY, "--resume")
    assert code == 0, err


def test_resume_removes_the_temporaries_of_a_killed_write(run_copy, data_dir, capsys):
    runs, copy = run_copy
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale = copy / f".last.pt.{dead}.tmp"
    stale.write_bytes(b"half a checkpoint")
    code, _, err = run(capsys, "train", "--dataset", "iemocap", "--name", "tiny", "--seed", "3", "--data-dir",
                       data_dir, "--runs-dir", runs, "--device", "cpu", "--epochs", "1", *TINY, "--resume")
    assert code == 0, err
    assert not stale.exists()


def test_analyze_out_onto_an_existing_file(tmp_path, capsys):
    target = tmp_path / "report.json"
    target.write_text("{}")
    assert_refused(run(capsys, "analyze", tmp_path, "--out", target, "--device", "cpu"), "is an existing file")
    assert target.read_text() == "{}"


# ------------------------------------------------------------------------------------------------ make-data
@pytest.mark.parametrize("extra, fragment", [
    (["--scale", "inf"], "scale must be a positive finite"),
    (["--scale", "0"], "scale must be a positive finite"),
    (["--scale", "-0.1"], "scale must be a positive finite"),
    (["--scale", "nan"], "scale must be a positive finite"),
    (["--bias-strength", "0.9"], "needs a bias_modality"),
    (["--bias-modality", "audio"], "--bias-strength"),
])
def test_make_data_refuses_what_it_cannot_or_would_not_plant(tmp_path, capsys, extra, fragment):
    assert_refused(run(capsys, "make-data", "--dataset", "iemocap", "--data-dir", tmp_path, *extra), fragment)
    assert not any(tmp_path.iterdir())


def test_make_data_into_an_unwritable_place(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_refused(run(capsys, "make-data", "--dataset", "iemocap", "--data-dir", blocker / "sub", "--scale", "0.001"),
                   "cannot create the data folder", str(blocker / "sub"))


def test_make_data_removes_a_dead_writers_temporary(tmp_path, capsys):
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale = tmp_path / f".iemocap_data.pkl.{dead}.tmp"
    stale.write_bytes(b"half a pickle")
    code, _, err = run(capsys, "make-data", "--dataset", "iemocap", "--data-dir", tmp_path, "--scale", "0.001")
    assert code == 0, err
    assert not stale.exists() and (tmp_path / "iemocap_data.pkl").is_file()
