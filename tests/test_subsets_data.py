"""Bias subsets of loaded data files: CH-SIMS's per-modality labels and an MMSA file's raw text reach them."""
import json
import pickle

import numpy as np
import pytest

from src.data import load_splits, write_synthetic
from src.data.synthetic import CUE_WORDS, SENTIMENT_WORDS
from src.errors import DataError
from src.eval.subsets import bias_subsets, label_codes
from tests.helpers import run

LENGTHS, DIMS = (3, 4, 2), (5, 3, 2)


def _split(scores, raw_text=None, seed=0, **extra):
    """One MMSA split of tiny random features around the given labels."""
    rng = np.random.default_rng(seed)
    n = len(scores)
    part = {m: rng.standard_normal((n, length, dim)).astype(np.float32)
            for m, length, dim in zip(("text", "audio", "vision"), LENGTHS, DIMS)}
    part["regression_labels"] = np.asarray(scores, dtype=np.float32)
    part["id"] = np.array([f"clip{i}" for i in range(n)], dtype=str)
    if raw_text is not None:
        part["raw_text"] = raw_text
    part.update(extra)
    return part


def _write(path, data):
    with open(path, "wb") as handle:
        pickle.dump(data, handle, protocol=4)
    return path


# CH-SIMS scores in [-1, 1]: the class of a score is its acc5 bin, [-1, -0.7], (-0.7, -0.1], (-0.1, 0.1],
# (0.1, 0.7], (0.7, 1]. The text labels below disagree with the multimodal ones exactly at rows 1 and 3:
# row 0 (0.2 vs 0.6) shares a bin but not a rounded score, row 1 (0.0 vs 0.3) shares a rounded score but
# not a bin, so a rounding of the scores gets both wrong.
SIMS_LABELS = [0.2, 0.0, -0.8, 0.4, -0.05, 1.0]
SIMS_OWN = {"T": [0.6, 0.3, -0.8, 0.8, 0.05, 0.8], "A": [0.2, 0.0, -0.8, 0.4, -0.05, 1.0],
            "V": [-0.2, 0.0, -0.8, 0.4, -0.05, 1.0]}


@pytest.mark.parametrize("task", ["sims_cls", "sims_regression"])
def test_sims_files_give_the_unimodal_label_subsets_by_acc5_bin(tmp_path, task):
    own = {f"regression_labels_{k}": np.asarray(v, dtype=np.float32) for k, v in SIMS_OWN.items()}
    data = {split: _split(SIMS_LABELS, seed=i, **own) for i, split in enumerate(("train", "valid", "test"))}
    splits = load_splits(None, "sims", task=task, data_file=_write(tmp_path / "aligned_39.pkl", data))
    subsets = bias_subsets(splits["train"], splits["test"])
    assert subsets["conflicting_text_label"] == [1, 3] and subsets["aligned_text_label"] == [0, 2, 4, 5]
    assert subsets["conflicting_audio_label"] == [] and subsets["conflicting_vision_label"] == [0]
    # The probes' labels are the same classes.
    assert label_codes(splits["test"].targets, task, splits["test"].scores).tolist() == [3, 2, 0, 3, 2, 4]


def test_label_codes_are_the_headline_classes_for_every_sentiment_task():
    scores = np.array([-1.0, -0.7, -0.6, -0.1, 0.0, 0.1, 0.2, 0.7, 0.8, 1.0], dtype=np.float32)
    bins = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert label_codes(scores, "sims_regression").tolist() == bins
    assert label_codes(np.array(bins), "sims_cls").tolist() == bins  # read back from the classes alone
    assert label_codes(np.array(bins), "sims_cls", scores).tolist() == bins
    mosi = np.array([-3.0, -1.4, 0.4, 0.6, 2.5, 3.0])
    assert label_codes(mosi, "regression").tolist() == [-3, -1, 0, 1, 2, 3]
    assert label_codes(np.array([0, 2, 3, 4, 5, 6]), "cls", mosi).tolist() == [-3, -1, 0, 1, 2, 3]


# Per-class counts over train (class 3, class -3): "good" (3, 0) and "bad" (0, 3) vary most, "film" (1, 2,
# cv 1/3 ≥ 0.1) carries the negative label, "plot" (1, 1, cv 0) none.
TRAIN_TEXT = (["good film", "good plot", "good"], ["bad film", "bad plot", "film"])
TEST_TEXT = ["Good plot!", "good film film", "plot", "bad", "Bad film"]
TEST_LABELS = [3.0, 3.0, -3.0, 3.0, -3.0]


def _word_file(tmp_path, test_text=np.array(TEST_TEXT, dtype=str)):
    train = _split([3.0] * 3 + [-3.0] * 3, np.array(TRAIN_TEXT[0] + TRAIN_TEXT[1], dtype=object))
    valid = _split([3.0, -3.0], ["good", "bad"], seed=1)  # a list is a file's text too
    test = _split(TEST_LABELS, test_text, seed=2)
    return _write(tmp_path / "aligned_50.pkl", {"train": train, "valid": valid, "test": test})


def test_raw_text_is_loaded_cached_and_gives_the_word_subsets(tmp_path):
    path = _word_file(tmp_path)
    for _ in range(2):  # converted, then read back from the cache
        splits = load_splits(None, "mosi", data_file=path)
        assert splits["test"].raw_text == TEST_TEXT and splits["valid"].raw_text == ["good", "bad"]
        assert "raw_text" not in splits["test"].get_batch([0, 1]) and "raw_text" not in splits["test"][0]
    subsets = bias_subsets(splits["train"], splits["test"])
    # Row 0: "good" votes 3 (its label); row 1: good 3, film -3 twice -> -3; row 2: no bias word; row 3: bad
    # -3; row 4: bad and film -3.
    assert subsets["aligned_words"] == [0, 4] and subsets["conflicting_words"] == [1, 3]


def test_a_file_without_raw_text_has_no_word_subsets(tmp_path):
    data = {split: _split([3.0, -3.0, 1.0], seed=i) for i, split in enumerate(("train", "valid", "test"))}
    splits = load_splits(None, "mosi", data_file=_write(tmp_path / "aligned_50.pkl", data))
    assert splits["test"].raw_text is None and "conflicting_words" not in bias_subsets(splits["train"], splits["test"])


@pytest.mark.parametrize("raw_text, expected", [
    (np.array([["a"], ["b"], ["c"], ["d"], ["e"]], dtype=str), "expected the words of each sample"),
    (np.array(["a", 1, "c", "d", "e"], dtype=object), "every entry must be a string"),
    (np.array([1.0, 2.0, 3.0, 4.0, 5.0]), "every entry must be a string"),
    (np.array(["a", "b"], dtype=str), r"raw_text 2"),
])
def test_malformed_raw_text_is_refused_naming_file_split_and_key(tmp_path, raw_text, expected):
    path = _word_file(tmp_path, raw_text)
    with pytest.raises(DataError, match=rf"aligned_50.pkl, split 'test'.*{expected}"):
        load_splits(None, "mosi", data_file=path)


def test_synthetic_raw_text_tells_the_text_label_and_the_text_shortcut(tmp_path):
    def raw(folder, **options):
        path = write_synthetic(tmp_path / folder, "sims", scale=0.01, seed=3, data_format="mmsa", **options)
        with open(path, "rb") as handle:
            return pickle.load(handle)

    plain = raw("plain")
    assert np.array_equal(plain["test"]["raw_text"], raw("again")["test"]["raw_text"])  # drawn from the seed
    biased = raw("biased", bias_modality="text", bias_strength=1.0)
    for split in ("train", "test"):
        # The sentiment word is the class of the text label (acc5 bins spread over SENTIMENT_WORDS).
        classes = label_codes(plain[split]["regression_labels_T"], "sims_regression")
        words = [text.split() for text in plain[split]["raw_text"]]
        assert all(SENTIMENT_WORDS[c * 6 // 4] in w for c, w in zip(classes, words))
        assert not any(set(CUE_WORDS) & set(w) for w in words)
    # A text shortcut of strength 1 adds the cue word of the label in train, and one independent of it in test.
    train_classes = label_codes(biased["train"]["regression_labels"], "sims_regression")
    assert all(CUE_WORDS[c * 6 // 4] in t.split() for c, t in zip(train_classes, biased["train"]["raw_text"]))
    test_classes = label_codes(biased["test"]["regression_labels"], "sims_regression")
    assert not all(CUE_WORDS[c * 6 // 4] in t.split() for c, t in zip(test_classes, biased["test"]["raw_text"]))


@pytest.mark.slow
def test_robustness_of_a_sims_run_reports_the_label_and_word_subsets(tmp_path, capsys):
    from tests.test_robustness_cli import FAST, TINY

    data, runs = tmp_path / "data", tmp_path / "runs"
    assert run(capsys, "make-data", "--dataset", "sims", "--format", "mmsa", "--data-dir", data, "--scale", "0.02",
               "--bias-modality", "text", "--bias-strength", "0.9")[0] == 0
    common = ["--dataset", "sims", "--data-dir", data, "--runs-dir", runs, "--device", "cpu", "--name", "causal"]
    code, _, err = run(capsys, "train", *common, "--epochs", "1", "--set", "data.aligned=true", *TINY)
    assert code == 0, err
    code, _, err = run(capsys, "robustness", *common, *FAST)
    assert code == 0, err
    result = json.loads((runs / "sims" / "causal" / "seed1" / "robustness" / "robustness.json").read_text())
    for name in ("text_label", "audio_label", "vision_label", "words"):
        assert {f"aligned_{name}", f"conflicting_{name}"} <= set(result["accuracy"]), name
    sizes = result["subset_sizes"]
    assert sizes["aligned_words"] + sizes["conflicting_words"] > 0
    assert sizes["aligned_text_label"] + sizes["conflicting_text_label"] == sizes["all"]
