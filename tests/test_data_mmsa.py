"""MMSA feature pickles, named splits, file-given feature sizes, CH-SIMS, and the cache's disk/header guards."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest

from src.data import load_splits, write_synthetic
from src.data.cache import cache_locations
from src.data.dataset import targets_from_labels
from src.eval.metrics import compute_metrics, sims_metrics
from src.errors import ConfigError, DataError, UserError
from tests.helpers import REPO, run

SIZES = {"train": 6, "valid": 4, "test": 4, "test_ood": 3}
LENGTHS = (5, 7, 6)
DIMS = (12, 5, 4)  # a "BERT" text of 12 features: sizes come from the file, not from the dataset name


def _arrays(seed=0, unimodal=False):
    """The same content for both layouts: {split: {text, audio, vision, score, lengths, id, ...}}."""
    rng = np.random.default_rng(seed)
    out = {}
    for split, n in SIZES.items():
        part = {m: rng.standard_normal((n, length, dim)).astype(np.float32)
                for m, length, dim in zip(("text", "audio", "vision"), LENGTHS, DIMS)}
        part["audio"][0, 0, 1] = -np.inf
        part["score"] = np.round(rng.uniform(-3, 3, n) * 3) / 3
        part["lengths"] = {m: rng.integers(1, length + 1, n) for m, length in zip(("audio", "vision"), LENGTHS[1:])}
        part["id"] = np.array([f"v{i}$_${split}" for i in range(n)], dtype=str)
        if unimodal:
            part.update({k: np.clip(part["score"] / 3 + rng.normal(0, 0.2, n), -1, 1) for k in "TAV"})
            part["score"] = np.clip(part["score"] / 3, -1, 1)
        out[split] = part
    return out


def _mult(arrays):
    return {split: {"text": p["text"], "audio": p["audio"], "vision": p["vision"],
                    "labels": p["score"].reshape(-1, 1, 1), "id": p["id"]} for split, p in arrays.items()}


def _mmsa(arrays):
    out = {}
    for split, p in arrays.items():
        part = {"text": p["text"], "audio": p["audio"], "vision": p["vision"],
                "regression_labels": p["score"].astype(np.float32), "id": p["id"],
                "raw_text": np.array(["words"] * len(p["score"]), dtype=object),
                "audio_lengths": [int(v) for v in p["lengths"]["audio"]],
                "vision_lengths": p["lengths"]["vision"].tolist(),
                "classification_labels": np.zeros(len(p["score"]), dtype=np.float32)}
        for k in "TAV":
            if k in p:
                part[f"regression_labels_{k}"] = p[k].astype(np.float32)
        out[split] = part
    return out


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        pickle.dump(data, handle, protocol=4)
    return path


def _no_cache(path):
    for directory in cache_locations(path):
        assert not directory.exists() or not any(directory.glob("*.npy")) and not (directory / "manifest.json").exists()


def test_mult_and_mmsa_pickles_of_the_same_arrays_give_the_same_data(tmp_path):
    arrays = _arrays()
    mult = load_splits(None, "mosi", data_file=_write(tmp_path / "a" / "mult.pkl", _mult(arrays)))
    mmsa = load_splits(None, "mosi", data_file=_write(tmp_path / "b" / "unaligned_50.pkl", _mmsa(arrays)))
    assert list(mult) == list(mmsa) == list(SIZES)  # train, valid, test and the extra test_ood
    assert mult["test"].source["format"] == "mult" and mmsa["test"].source["format"] == "mmsa"
    for split in SIZES:
        a, b = mult[split], mmsa[split]
        assert a.dims == b.dims == DIMS and a.seq_lens == b.seq_lens == LENGTHS
        batch_a, batch_b = a.get_batch(range(len(a))), b.get_batch(range(len(b)))
        assert batch_a.keys() == batch_b.keys()
        for key in batch_a:
            assert batch_a[key].dtype == batch_b[key].dtype and bool((batch_a[key] == batch_b[key]).all()), key
        assert a.ids == b.ids
        assert float(batch_b["audio"][0, 0, 1]) == 0.0  # MMSA's audio -inf reads as 0 too
    # The cached .npy files themselves are byte-identical.
    for split in SIZES:
        for key in ("text", "audio", "vision", "labels"):
            name = f"{split}.{key}.npy"
            files = [cache_locations(p)[0] / name for p in (tmp_path / "a" / "mult.pkl", tmp_path / "b" / "unaligned_50.pkl")]
            assert files[0].read_bytes() == files[1].read_bytes(), name


def test_data_format_insists_on_a_layout(tmp_path):
    path = _write(tmp_path / "m.pkl", _mmsa(_arrays()))
    assert load_splits(None, "mosi", data_file=path, data_format="mmsa")["train"].dims == DIMS
    with pytest.raises(DataError, match="MMSA-format.*--data-format mult"):
        load_splits(None, "mosi", data_file=path, data_format="mult")


def test_a_file_that_is_one_split_is_named_after_the_file(tmp_path):
    one = _mmsa(_arrays())["test"]
    splits = load_splits(None, "mosi", data_file=_write(tmp_path / "test_iid.pkl", one))
    assert list(splits) == ["test_iid"] and len(splits["test_iid"]) == SIZES["test"]


def _malformed(name):
    data = _mmsa(_arrays())
    if name == "lengths":
        data["valid"]["audio_lengths"][2] = LENGTHS[1] + 3
    elif name == "label_key":
        del data["test"]["regression_labels"]
    elif name == "object_array":
        data["train"]["vision"] = data["train"]["vision"].astype(object)
    elif name == "count":
        data["test_ood"]["regression_labels"] = data["test_ood"]["regression_labels"][:-1]
    return data


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("case, expected", [
    ("lengths", ["split 'valid'", "key 'audio_lengths'", "outside 0..7"]),
    ("label_key", ["split 'test'", "no label key"]),
    ("object_array", ["split 'train'", "key 'vision'", "dtype object"]),
    ("count", ["split 'test_ood'", "regression_labels 2", "text 3"]),
    ("reduce", ["posix.system"]),
])
def test_malformed_mmsa_files_exit_2_naming_file_split_and_key(tmp_path, capsys, case, expected):
    data = _malformed(case) if case != "reduce" else {"train": {"text": _Payload(), "regression_labels": []}}
    path = _write(tmp_path / "data" / "unaligned_50.pkl", data)
    runs = tmp_path / "runs"
    code, _, err = run(capsys, "train", "--dataset", "mosi", "--name", "x", "--data-file", path, "--runs-dir", runs,
                       "--device", "cpu")
    assert code == 2, err
    message = err.strip()
    assert "\n" not in message and "Traceback" not in message
    for part in [str(path), *expected]:
        assert part in message, f"{part!r} not in {message}"
    assert not runs.exists()
    _no_cache(path)


def test_unknown_split_and_other_feature_sizes_are_refused_by_name(tmp_path):
    from src.run.trained import check_feature_dims, pick_split

    splits = load_splits(None, "mosi", data_file=_write(tmp_path / "m.pkl", _mmsa(_arrays())))
    with pytest.raises(UserError, match="test_nn_audio.*train, valid, test, test_ood"):
        pick_split(splits, "test_nn_audio")
    with pytest.raises(UserError) as error:
        check_feature_dims({"feature_dims": [300, 5, 20]}, tmp_path / "best_acc.pt", splits["test"])
    assert "(300, 5, 20)" in str(error.value) and str(DIMS) in str(error.value) and "m.pkl" in str(error.value)
    check_feature_dims({"feature_dims": list(DIMS)}, tmp_path / "best_acc.pt", splits["test"])


def test_sims_labels_per_modality_are_batch_keys(tmp_path):
    arrays = _arrays(unimodal=True)
    splits = load_splits(None, "sims", data_file=_write(tmp_path / "unaligned_39.pkl", _mmsa(arrays)))
    batch = splits["train"].get_batch([0, 1, 2])
    assert splits["train"].task == "sims_cls" and splits["train"].output_dim == 5
    for key, letter in (("label_t", "T"), ("label_a", "A"), ("label_v", "V")):
        expected, _ = targets_from_labels(arrays["train"][letter][:3].reshape(-1, 1, 1), "sims_cls")
        assert batch[key].tolist() == expected.tolist()
    # A SIMS file without them is refused, naming the key.
    data = _mmsa(arrays)
    del data["valid"]["regression_labels_A"]
    with pytest.raises(DataError, match="split 'valid'.*regression_labels_A"):
        load_splits(None, "sims", data_file=_write(tmp_path / "bad.pkl", data))


def test_unimodal_labels_train_each_branch_on_its_own_label():
    import torch

    from src.causal.loss import causal_loss_terms

    torch.manual_seed(0)
    out = {key: torch.randn(6, 5) for key in ("logits_te", "logits_t", "logits_a", "logits_v", "te", "nde",
                                               "nde_t", "nde_a", "nde_v")}
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    own = {"label_t": torch.tensor([4, 4, 4, 4, 4, 4]), "label_a": target, "label_v": torch.tensor([1] * 6)}
    plain = causal_loss_terms(out, target)
    split = causal_loss_terms(out, target, unimodal_targets=own)
    expected = 0.1 * torch.nn.functional.cross_entropy(out["logits_t"], own["label_t"])
    assert torch.equal(split["task_text"], expected) and not torch.equal(split["task_text"], plain["task_text"])
    assert torch.equal(split["task_audio"], plain["task_audio"])  # label_a equals the sample's label here
    assert torch.equal(split["task_te"], plain["task_te"]) and torch.equal(split["kl"], plain["kl"])


def test_sims_classes_and_metrics_follow_mmsa_bins():
    scores = np.array([-1.0, -0.7, -0.6, -0.1, 0.0, 0.1, 0.2, 0.7, 0.8, 1.0])
    classes, _ = targets_from_labels(scores.reshape(-1, 1, 1), "sims_cls")
    assert classes.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # (a, b] bins, -1 in the lowest
    perfect = sims_metrics(scores, scores)
    assert perfect["acc2"] == perfect["acc3"] == perfect["acc5"] == 1.0 and perfect["mae"] == 0.0
    # 0.05 and -0.05 share the acc3/acc5 bin (-0.1, 0.1] but not the acc2 one ([-1, 0] vs (0, 1]).
    result = sims_metrics(np.array([0.05, 2.0]), np.array([-0.05, 1.0]))
    assert result["acc2"] == 0.5 and result["acc3"] == 1.0 and result["acc5"] == 1.0
    assert result["mae"] == pytest.approx(0.05)  # the prediction 2.0 is clipped to 1 first
    logits = np.eye(5)[[0, 4]]
    assert compute_metrics(logits, np.array([0, 4]), "sims_cls")["acc5"] == 1.0


def test_cache_detects_an_edited_npy_header(tmp_path):
    path = _write(tmp_path / "m.pkl", _mmsa(_arrays()))
    before = load_splits(None, "mosi", data_file=path)["train"].get_batch([0])["text"].clone()
    array = cache_locations(path)[0] / "train.text.npy"
    raw = array.read_bytes()
    assert b"'fortran_order': False" in raw
    array.write_bytes(raw.replace(b"'fortran_order': False", b"'fortran_order': True ", 1))  # same length
    after = load_splits(None, "mosi", data_file=path)["train"].get_batch([0])["text"]
    assert bool((after == before).all())  # rebuilt from the pickle, not read transposed
    assert b"'fortran_order': False" in array.read_bytes()


FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {repo!r})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as a full disk does
resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
import main
sys.exit(main.main(["train", "--dataset", "mosi", "--name", "x", "--data-file", {path!r}, "--runs-dir", {runs!r},
                    "--device", "cpu"]))
"""


@pytest.mark.slow
def test_a_full_disk_during_conversion_is_a_message_and_leaves_nothing(tmp_path):
    rng = np.random.default_rng(0)
    data = _mmsa(_arrays())
    data["train"]["vision"] = rng.standard_normal((SIZES["train"], LENGTHS[2], 20_000)).astype(np.float32)
    for split in ("valid", "test", "test_ood"):
        data[split]["vision"] = np.zeros((SIZES[split], LENGTHS[2], 20_000), np.float32)
    path = _write(tmp_path / "data" / "m.pkl", data)  # the pickle is written before the limit applies
    script = FULL_DISK.format(repo=str(REPO), path=str(path), runs=str(tmp_path / "runs"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CAUSALMER_CACHE_DIR": str(tmp_path / "user_cache")})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "cannot write" in done.stderr
    cache = cache_locations(path)[0]
    assert not list(cache.glob("*.npy")) and not list(cache.glob(".*.tmp")) and not (cache / "manifest.json").exists()


def test_make_data_scale_is_bounded_before_anything_is_drawn(tmp_path, capsys, monkeypatch):
    from src.data import synthetic

    def must_not_run(*args, **kwargs):
        raise AssertionError("the generator ran for a file that cannot fit")

    monkeypatch.setattr(synthetic, "_split", must_not_run)
    code, _, err = run(capsys, "make-data", "--dataset", "mosei_senti", "--unaligned", "--scale", "1e6",
                       "--data-dir", tmp_path)
    assert code == 2 and "--scale" in err and "GiB" in err and "Nothing was written" in err
    assert not any(tmp_path.iterdir())
    with pytest.raises(ConfigError):
        write_synthetic(tmp_path, "mosi", data_format="mmsa", scale=1e7)


def test_make_data_writes_the_mmsa_layout(tmp_path):
    path = write_synthetic(tmp_path, "sims", aligned=False, scale=0.003, data_format="mmsa", extra_splits=("test_ood",))
    assert path == tmp_path / "SIMS" / "Processed" / "unaligned_39.pkl"
    with open(path, "rb") as handle:
        data = pickle.load(handle)
    assert list(data) == ["train", "valid", "test", "test_ood"]
    part = data["train"]
    assert part["text"].shape[1:] == (39, 768) and part["audio"].shape[1:] == (400, 33)
    assert part["vision"].shape[1:] == (55, 709) and np.isneginf(part["audio"]).any()
    assert isinstance(part["audio_lengths"], list) and max(part["audio_lengths"]) <= 400
    assert np.abs(part["regression_labels"]).max() <= 1.0 and part["regression_labels_T"].shape == (len(part["text"]),)
    # Padding comes after the valid frames, as MMSA's files have it.
    first = part["audio_lengths"][0]
    assert not part["audio"][0, first:].any()
    splits = load_splits(tmp_path, "sims", aligned=False)
    assert splits["test_ood"].dims == (768, 33, 709) and "label_v" in splits["valid"].get_batch([0])


def _metrics(run_dir):
    data = json.loads((run_dir / "metrics.json").read_text())
    data.pop("data")
    for which in ("best_loss", "best_acc"):
        data[which].pop("checkpoint")
    for entry in data["history"]:
        entry.pop("seconds"), entry.pop("samples_per_second")
    return data


@pytest.mark.slow
def test_mult_and_mmsa_files_train_and_evaluate_identically(tmp_path, capsys):
    arrays = _arrays()
    files = {"mult": _write(tmp_path / "a.pkl", _mult(arrays)), "mmsa": _write(tmp_path / "b.pkl", _mmsa(arrays))}
    runs = tmp_path / "runs"
    for name, path in files.items():
        code, _, err = run(capsys, "train", "--dataset", "mosi", "--name", name, "--data-file", path, "--runs-dir",
                           runs, "--device", "cpu", "--epochs", "1", "--set", "train.batch_size=4")
        assert code == 0, err
    first, second = (_metrics(runs / "mosi" / name / "seed1") for name in files)
    assert first == second and "test_ood" in first["best_acc"]
    evaluated = []
    for name in files:
        code, out, err = run(capsys, "eval", "--dataset", "mosi", "--name", name, "--runs-dir", runs, "--device", "cpu",
                             "--split", "test_ood")
        assert code == 0, err
        evaluated.append(json.loads((runs / "mosi" / name / "seed1" / "eval_best_acc_test_ood.json").read_text()))
    assert evaluated[0]["predictions"] == evaluated[1]["predictions"] and evaluated[0]["split"] == "test_ood"
    # analyze of a named split sits beside the test split's analysis, never over it
    run_dir = runs / "mosi" / "mult" / "seed1"
    for split in ("test", "test_ood"):
        code, _, err = run(capsys, "analyze", run_dir, "--device", "cpu", "--split", split)
        assert code == 0, err
    own, ood = (json.loads((run_dir / name).read_text()) for name in ("analysis.json", "analysis_test_ood.json"))
    assert [r["split"] for r in own.values()] == ["test"] and [r["split"] for r in ood.values()] == ["test_ood"]


@pytest.mark.slow
@pytest.mark.parametrize("dataset, model, options", [
    # CausalMER on MOSI-layout MMSA files: the identical-training test above.
    ("mosi", "mult", []), ("mosi", "dmd", []), ("mosi", "pmr", []), ("sims", "causalmer", []), ("sims", "causalmer", ["--set", "loss.unimodal_labels=true"]),
])
def test_mmsa_files_train_every_backbone(tmp_path_factory, capsys, dataset, model, options):
    data_dir = tmp_path_factory.getbasetemp() / f"mmsa_{dataset}"
    if not data_dir.exists():
        write_synthetic(data_dir, dataset, aligned=True, scale=0.004, data_format="mmsa")
    path = data_dir / ("MOSI/Processed/aligned_50.pkl" if dataset == "mosi" else "SIMS/Processed/aligned_39.pkl")
    runs = tmp_path_factory.mktemp("runs")
    code, out, err = run(capsys, "train", "--dataset", dataset, "--model", model, "--name", "x", "--data-file", path,
                         "--runs-dir", runs, "--device", "cpu", "--epochs", "1", "--set", "train.batch_size=4",
                         "--set", "train.accumulate=1", *options)
    assert code == 0, err
    results = json.loads((runs / dataset / "x" / "seed1" / "metrics.json").read_text())
    assert results["data"]["format"] == "mmsa"
    headline = "acc5" if dataset == "sims" else "acc7"
    assert 0.0 <= results["best_acc"]["test"]["predictions"]["m"][headline] <= 1.0


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 6 MB tmpfs at tmp_path/fs, where the system lets this process mount one (root in a container); else skip."""
    mount = tmp_path / "fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("mounting a small tmpfs is not permitted here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], capture_output=True)


@pytest.mark.slow
def test_a_really_full_disk_is_a_message_not_sigbus(tiny_filesystem, capsys):
    # Memory-mapped writes into a sparse file die with SIGBUS (exit 135) when the disk fills; ordinary
    # writes into reserved space fail with ENOSPC, which becomes a message.
    rng = np.random.default_rng(0)
    data = {s: {"text": rng.standard_normal((20, 50, 300)).astype(np.float32),
                "audio": rng.standard_normal((20, 50, 5)).astype(np.float32),
                "vision": rng.standard_normal((20, 50, 20)).astype(np.float32),
                "labels": rng.uniform(-3, 3, (20, 1, 1))} for s in ("train", "valid", "test")}
    path = _write(tiny_filesystem / "mosi_data.pkl", data)  # 3.8 MB of 6: the cache cannot fit
    script = ("import sys; sys.path.insert(0, {repo!r}); import main; sys.exit(main.main(['train', '--dataset', "
              "'mosi', '--name', 'x', '--data-file', {path!r}, '--runs-dir', {runs!r}, '--device', 'cpu']))")
    done = subprocess.run([sys.executable, "-c", script.format(repo=str(REPO), path=str(path),
                                                                runs=str(tiny_filesystem.parent / "runs"))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "no space left" in done.stderr and "Traceback" not in done.stderr
    cache = cache_locations(path)[0]
    assert not list(cache.glob("*.npy")) and not list(cache.glob(".*.tmp"))
