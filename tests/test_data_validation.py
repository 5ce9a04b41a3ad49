"""Each way a data file can be wrong gives a DataError naming the file, split and key."""
import pickle

import numpy as np
import pytest

from src.data import TRAINING_SPLITS, data_file, load_splits, require_splits
from src.errors import DataError


@pytest.fixture
def broken(tmp_path, synthetic_data):
    """broken(dataset, change) -> (data_dir, path): a copy of a tiny file with `change` applied."""
    def make(dataset, change):
        with open(data_file(synthetic_data(dataset), dataset), "rb") as handle:
            data = pickle.load(handle)
        change(data)
        path = data_file(tmp_path, dataset)
        with open(path, "wb") as handle:
            pickle.dump(data, handle, protocol=4)
        return tmp_path, path
    return make


def _error(data_dir, dataset) -> str:
    with pytest.raises(DataError) as error:
        load_splits(data_dir, dataset)
    return str(error.value)


def _assert_names(message, *parts):
    for part in parts:
        assert part in message, f"{part!r} not in: {message}"


def test_missing_split(broken):
    # A file may hold any splits (an OOD file may hold only its test split); training needs train and valid.
    data_dir, path = broken("mosi", lambda d: d.pop("valid"))
    splits = load_splits(data_dir, "mosi")
    assert list(splits) == ["train", "test"]
    with pytest.raises(DataError) as error:
        require_splits(splits, TRAINING_SPLITS, "training")
    _assert_names(str(error.value), str(path), "'valid'", "training", "train, test")


def test_missing_key(broken):
    data_dir, path = broken("iemocap", lambda d: d["test"].pop("vision"))
    _assert_names(_error(data_dir, "iemocap"), str(path), "split 'test'", "key 'vision' is missing")


def test_not_a_dict(broken, tmp_path):
    path = data_file(tmp_path, "mosi")
    path.write_bytes(pickle.dumps([np.zeros(3)]))
    _assert_names(_error(tmp_path, "mosi"), str(path), "expected a dict", "found a list")


def test_wrong_rank(broken):
    def flatten(data):
        data["train"]["audio"] = data["train"]["audio"].reshape(len(data["train"]["audio"]), -1)
    data_dir, path = broken("mosi", flatten)
    _assert_names(_error(data_dir, "mosi"), str(path), "split 'train'", "key 'audio'", "3-D array")


def test_modalities_disagree_on_n(broken):
    def drop_one(data):
        data["valid"]["text"] = data["valid"]["text"][:-1]
    data_dir, path = broken("mosei_senti", drop_one)
    message = _error(data_dir, "mosei_senti")
    _assert_names(message, str(path), "split 'valid'", "number of samples", "text 3", "audio 4")


@pytest.mark.parametrize("dataset, labels_shape", [("iemocap", (4, 1, 1)), ("mosi", (4, 4, 2)), ("mosi", (4,))])
def test_wrong_label_layout(broken, dataset, labels_shape):
    def relabel(data):
        data["train"]["labels"] = np.zeros(labels_shape)
    data_dir, path = broken(dataset, relabel)
    expected = "(N, 4, 2)" if dataset == "iemocap" else "(N, 1, 1)"
    _assert_names(_error(data_dir, dataset), str(path), "split 'train'", "key 'labels'", expected,
                  f"found shape {labels_shape}")


def test_iemocap_labels_must_be_one_hot_values(broken):
    def smear(data):
        data["test"]["labels"] = data["test"]["labels"] * 0.5
    data_dir, path = broken("iemocap", smear)
    _assert_names(_error(data_dir, "iemocap"), str(path), "split 'test'", "key 'labels'", "neither 0 nor 1")


def test_feature_size_must_agree_across_splits(broken):
    # Feature sizes come from the file (BERT text, a user's own extractor), but one file has one size.
    def widen(data):
        data["valid"]["audio"] = np.zeros(data["valid"]["audio"].shape[:2] + (74,))
    data_dir, path = broken("mosi", widen)
    _assert_names(_error(data_dir, "mosi"), str(path), "split 'valid'", "key 'audio'", ", 74)", ", 5)")


def test_sequence_length_must_agree_across_splits(broken):
    def shorten(data):
        data["test"]["vision"] = data["test"]["vision"][:, 1:]
    data_dir, path = broken("iemocap", shorten)
    _assert_names(_error(data_dir, "iemocap"), str(path), "split 'test'", "key 'vision'", "(19, 35)")


def test_non_numeric_array(broken):
    def to_text(data):
        data["train"]["text"] = data["train"]["text"].astype(str)
    data_dir, path = broken("mosi", to_text)
    _assert_names(_error(data_dir, "mosi"), str(path), "split 'train'", "key 'text'", "real numbers")


def test_truncated_file(tmp_path, synthetic_data):
    payload = data_file(synthetic_data("mosi"), "mosi").read_bytes()
    path = data_file(tmp_path, "mosi")
    path.write_bytes(payload[: len(payload) * 2 // 3])
    _assert_names(_error(tmp_path, "mosi"), str(path), "truncated")
    assert not (tmp_path / "mosi_data.pkl.cache" / "manifest.json").exists()


def test_non_pickle_file(tmp_path):
    path = data_file(tmp_path, "iemocap")
    path.write_text("train,valid,test\n1,2,3\n")
    _assert_names(_error(tmp_path, "iemocap"), str(path), "not a readable pickle")


def test_malicious_file_is_refused_and_not_run(tmp_path):
    victim = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(victim)!r}, 'w').close()",)

    path = data_file(tmp_path, "iemocap")
    path.write_bytes(pickle.dumps({"train": {"text": Payload()}}, protocol=4))
    _assert_names(_error(tmp_path, "iemocap"), str(path), "builtins.exec")
    assert not victim.exists()
