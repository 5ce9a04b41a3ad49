"""Synthetic files: the exact MulT layout, determinism, genuine signal and the planted shortcut."""
import pickle

import numpy as np
import pytest

from src.data import DEFAULT_DEMO, get_spec, load_splits, shortcut_directions, write_synthetic
from src.data.synthetic import signal_directions, split_sizes
from src.errors import ConfigError, DataError


def _read(path):
    with open(path, "rb") as handle:  # our own file: plain pickle is fine
        return pickle.load(handle)


@pytest.mark.parametrize("dataset", ["iemocap", "mosei_senti", "mosi"])
@pytest.mark.parametrize("aligned", [True, False])
def test_layout_is_the_mult_one(synthetic_data, dataset, aligned):
    spec = get_spec(dataset)
    path = synthetic_data(dataset, aligned) / spec.file_name(aligned)
    data = _read(path)
    assert list(data) == ["train", "valid", "test"]
    for split, n in zip(data, split_sizes(dataset, 0.0005)):
        part = data[split]
        expected_keys = {"text", "audio", "vision", "labels"} | ({"id"} if dataset != "iemocap" else set())
        assert set(part) == expected_keys
        for modality, length, dim in zip(("text", "audio", "vision"), spec.seq_lens(aligned), spec.dims):
            x = part[modality]
            assert x.shape == (n, length, dim)
            expected_dtype = np.float32 if (dataset == "mosi" and modality == "text") else np.float64
            assert x.dtype == expected_dtype
            # Left padding: the padded (all-zero) steps come first, then only real steps.
            real = np.any(x != 0, axis=-1)
            assert np.all(real[:, -1]) and not np.all(real)
            assert np.all(np.diff(real.astype(int), axis=1) >= 0)
        assert np.isneginf(part["audio"]).any()
        assert np.isfinite(part["text"]).all() and np.isfinite(part["vision"]).all()
        labels = part["labels"]
        assert labels.dtype == np.float64 and labels.shape == (n, *spec.label_shape)
        if dataset == "iemocap":
            assert set(np.unique(labels)) <= {0.0, 1.0} and np.all(labels.sum(-1) == 1)
        else:
            assert np.all(np.abs(labels) <= 3)
            assert part["id"].shape == (n, 3) and part["id"].dtype.kind == "S"


def test_sizes_follow_the_scale():
    assert split_sizes("iemocap", DEFAULT_DEMO["scale"]) == (272, 80, 94)
    assert split_sizes("mosei_senti", 1e-6) == (4, 4, 4)


def test_same_seed_gives_identical_bytes(tmp_path):
    first = write_synthetic(tmp_path / "a", "mosi", scale=0.002, seed=3, bias_modality="vision", bias_strength=0.5)
    second = write_synthetic(tmp_path / "b", "mosi", scale=0.002, seed=3, bias_modality="vision", bias_strength=0.5)
    third = write_synthetic(tmp_path / "c", "mosi", scale=0.002, seed=4, bias_modality="vision", bias_strength=0.5)
    assert first.read_bytes() == second.read_bytes()
    assert first.read_bytes() != third.read_bytes()
    assert not list(tmp_path.glob("*/.*.tmp"))


def _time_mean(x):
    real = np.any(x != 0, axis=-1, keepdims=True)
    return np.where(np.isfinite(x), x, 0).sum(1) / real.sum(1)


@pytest.fixture(scope="module")
def biased(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("biased")
    path = write_synthetic(data_dir, "iemocap", scale=0.04, seed=0, bias_modality="audio", bias_strength=0.9)
    return _read(path)


def _agreement(data, split, modality, directions):
    """How often the strongest coordinate along `directions` names the sample's emotion."""
    # Centred on the train mean, so the features' constant offset doesn't pick the emotion.
    centre = _time_mean(data["train"][modality]).mean(0)
    coordinates = (_time_mean(data[split][modality]) - centre) @ directions
    return np.mean(coordinates.argmax(-1) == data[split]["labels"][..., 1].argmax(-1))


def test_every_modality_carries_label_signal(biased):
    emotion = biased["test"]["labels"][..., 1].argmax(-1)
    majority = np.bincount(emotion, minlength=4).max() / len(emotion)
    for modality in ("text", "audio", "vision"):
        accuracy = _agreement(biased, "test", modality, signal_directions("iemocap", modality, seed=0))
        assert accuracy > majority + 0.15, (modality, accuracy, majority)


def test_no_signal_means_no_signal(tmp_path):
    data = _read(write_synthetic(tmp_path, "iemocap", scale=0.04, signal=0.0))
    assert _agreement(data, "test", "text", signal_directions("iemocap", "text")) < 0.5


def test_bias_only_adds_the_shortcut(tmp_path):
    plain = _read(write_synthetic(tmp_path / "plain", "mosi", scale=0.002, seed=5))
    biased = _read(write_synthetic(tmp_path / "biased", "mosi", scale=0.002, seed=5, bias_modality="vision",
                                   bias_strength=0.7))
    for split in plain:
        for key in ("text", "audio", "labels", "id"):
            assert np.array_equal(plain[split][key], biased[split][key], equal_nan=key != "id")
        difference = biased[split]["vision"] - plain[split]["vision"]
        directions = shortcut_directions("mosi", "vision", seed=5)
        # The whole difference lies in the shortcut's directions.
        assert np.allclose(difference - difference @ directions @ directions.T, 0, atol=1e-9)
        assert np.abs(difference).max() > 0.1


def test_planted_shortcut_follows_the_label_in_train_and_valid_only(biased):
    def shortcut_agreement(split, modality):
        return _agreement(biased, split, modality, shortcut_directions("iemocap", modality, seed=0))

    assert shortcut_agreement("train", "audio") > 0.85 and shortcut_agreement("valid", "audio") > 0.85
    assert shortcut_agreement("test", "audio") < 0.5
    # The other modalities carry no shortcut.
    assert shortcut_agreement("train", "text") < 0.5 and shortcut_agreement("train", "vision") < 0.5


def test_written_file_loads_and_bad_arguments_are_refused(tmp_path):
    write_synthetic(tmp_path, "mosei_senti", aligned=False, scale=0.0001, bias_modality="text", bias_strength=1.0)
    assert len(load_splits(tmp_path, "mosei_senti", aligned=False)["test"]) == 4
    with pytest.raises(DataError, match="unknown dataset"):
        write_synthetic(tmp_path, "meld")
    with pytest.raises(ConfigError, match="bias_modality"):
        write_synthetic(tmp_path, "mosi", bias_modality="video")
    with pytest.raises(ConfigError, match="bias_strength"):
        write_synthetic(tmp_path, "mosi", bias_modality="text", bias_strength=1.5)
    with pytest.raises(ConfigError, match="scale"):
        write_synthetic(tmp_path, "mosi", scale=0)
