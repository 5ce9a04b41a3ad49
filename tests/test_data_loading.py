"""Loading every layout, the item/batch contract, value handling and the file-naming errors."""
import logging
import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from src.data import data_file, get_spec, load_splits, output_dim, resolve_task, write_synthetic
from src.errors import ConfigError, DataError

LAYOUTS = [(name, aligned) for name in ("iemocap", "mosei_senti", "mosi") for aligned in (True, False)]


@pytest.mark.parametrize("dataset, aligned", LAYOUTS)
def test_every_layout_loads_with_the_contract(synthetic_data, dataset, aligned):
    spec = get_spec(dataset)
    splits = load_splits(synthetic_data(dataset, aligned), dataset, aligned=aligned)
    assert set(splits) == {"train", "valid", "test"}
    seq_lens = spec.seq_lens(aligned)
    for split, ds in splits.items():
        assert (ds.dataset, ds.split, ds.task) == (dataset, split, spec.default_task)
        assert ds.dims == spec.dims and ds.seq_lens == seq_lens
        assert ds.output_dim == (8 if dataset == "iemocap" else 7)
        assert len(ds) >= 4
        item = ds[0]
        for modality, length, dim in zip(("text", "audio", "vision"), seq_lens, spec.dims):
            assert item[modality].shape == (length, dim) and item[modality].dtype == torch.float32
            assert torch.isfinite(item[modality]).all()
        if dataset == "iemocap":
            assert item["target"].shape == (4,) and item["target"].dtype == torch.int64
            assert "score" not in item and ds.ids is None
        else:
            assert item["target"].shape == () and item["target"].dtype == torch.int64
            assert item["score"].shape == () and item["score"].dtype == torch.float32
            assert len(ds.ids) == len(ds) and all(isinstance(i, str) for i in ds.ids)


def test_targets_follow_the_labels(synthetic_data):
    data_dir = synthetic_data("mosi")
    with open(data_file(data_dir, "mosi"), "rb") as handle:  # our own file: plain pickle is fine
        raw = pickle.load(handle)["train"]
    score = raw["labels"][:, 0, 0]
    cls = load_splits(data_dir, "mosi")["train"]
    assert np.array_equal(cls.targets, np.round(np.clip(score, -3, 3)).astype(np.int64) + 3)
    assert np.allclose(cls.scores, score)
    regression = load_splits(data_dir, "mosi", task="regression")["train"]
    assert regression.output_dim == 1
    item = regression[1]
    assert item["target"].dtype == torch.float32 and float(item["target"]) == pytest.approx(score[1], abs=1e-6)
    assert raw["id"][0, 0].decode() in cls.ids[0]

    iemocap_dir = synthetic_data("iemocap")
    with open(data_file(iemocap_dir, "iemocap"), "rb") as handle:
        labels = pickle.load(handle)["test"]["labels"]
    test = load_splits(iemocap_dir, "iemocap")["test"]
    assert np.array_equal(test.targets, labels.argmax(-1))


def test_features_equal_the_pickle_in_float32(synthetic_data):
    data_dir = synthetic_data("iemocap")
    with open(data_file(data_dir, "iemocap"), "rb") as handle:
        raw = pickle.load(handle)["valid"]
    ds = load_splits(data_dir, "iemocap")["valid"]
    audio = raw["audio"].copy()
    assert np.isneginf(audio).any()
    audio[np.isneginf(audio)] = 0
    batch = ds.get_batch(range(len(ds)))
    assert np.array_equal(batch["audio"].numpy(), audio.astype(np.float32))
    assert np.array_equal(batch["text"].numpy(), raw["text"].astype(np.float32))


def test_get_batch_keeps_the_requested_order(synthetic_data):
    ds = load_splits(synthetic_data("mosei_senti"), "mosei_senti")["train"]
    order = [3, 0, 2, 2, -1]
    batch = ds.get_batch(order)
    for position, index in enumerate(order):
        item = ds[index]
        for key, value in item.items():
            assert torch.equal(batch[key][position], value), key
    assert ds[torch.tensor([1, 2])]["text"].shape[0] == 2
    with pytest.raises(IndexError):
        ds.get_batch([len(ds)])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_iter_batches_and_dataloader_cover_the_split(synthetic_data):
    ds = load_splits(synthetic_data("iemocap"), "iemocap")["train"]
    seen = torch.cat([b["target"] for b in ds.iter_batches(3, shuffle=True, generator=torch.Generator().manual_seed(0))])
    assert seen.shape == (len(ds), 4)
    assert ds.num_batches(3) == len(list(ds.iter_batches(3)))
    loader = DataLoader(ds, sampler=BatchSampler(RandomSampler(ds), 2, drop_last=False), batch_size=None)
    sizes = [batch["text"].shape for batch in loader]
    assert sum(s[0] for s in sizes) == len(ds) and sizes[0][1:] == (20, 300)
    # Pickled for a worker, the dataset reopens its memory maps instead of carrying the arrays.
    clone = pickle.loads(pickle.dumps(ds))
    assert len(pickle.dumps(ds)) < 20_000
    assert torch.equal(clone[1]["vision"], ds[1]["vision"])


def test_audio_neg_inf_count_is_logged(tmp_path, caplog):
    path = write_synthetic(tmp_path, "mosi", scale=0.0005)
    with open(path, "rb") as handle:
        data = pickle.load(handle)
    expected = sum(int(np.isneginf(data[s]["audio"]).sum()) for s in ("train", "valid", "test"))
    assert expected > 0
    with caplog.at_level(logging.INFO, logger="causalmer.data"):
        load_splits(tmp_path, "mosi")
    assert f"{expected} -inf values read as 0" in caplog.text


def _rewrite(path, change):
    with open(path, "rb") as handle:
        data = pickle.load(handle)
    change(data)
    with open(path, "wb") as handle:
        pickle.dump(data, handle, protocol=4)


def test_nan_outside_audio_is_reported_and_cleaned_on_request(tmp_path):
    path = write_synthetic(tmp_path, "iemocap", scale=0.0005)

    def poison(data):
        data["valid"]["vision"][0, -1, :3] = np.nan
        data["test"]["text"][1, -1, 0] = np.inf
    _rewrite(path, poison)

    with pytest.raises(DataError) as error:
        load_splits(tmp_path, "iemocap")
    message = str(error.value)
    for part in (str(path), "split 'valid' key 'vision': 3 NaN", "split 'test' key 'text': 1 +inf",
                 "clean_nonfinite=True", "--clean-nonfinite"):
        assert part in message, part

    cleaned = load_splits(tmp_path, "iemocap", clean_nonfinite=True)
    assert torch.equal(cleaned["valid"][0]["vision"][-1, :3], torch.zeros(3))
    assert float(cleaned["test"][1]["text"][-1, 0]) == 0.0
    # The cache now holds cleaned values, but a load that did not ask for cleaning still fails.
    with pytest.raises(DataError, match="3 NaN"):
        load_splits(tmp_path, "iemocap")


def test_unknown_dataset_and_task():
    with pytest.raises(DataError, match="unknown dataset 'cmu_mosei'.*iemocap, mosei_senti, mosi"):
        load_splits("data", "cmu_mosei")
    with pytest.raises(ConfigError, match="task 'cls'.*iemocap.*binary"):
        load_splits("data", "iemocap", task="cls")
    with pytest.raises(ConfigError, match="valid tasks: cls, regression"):
        resolve_task("mosi", "binary")
    assert resolve_task("mosei_senti", None) == "cls" and output_dim("regression") == 1


@pytest.mark.parametrize("dataset, aligned, name", [
    ("iemocap", True, "iemocap_data.pkl"), ("iemocap", False, "iemocap_data_noalign.pkl"),
    ("mosei_senti", True, "mosei_senti_data.pkl"), ("mosei_senti", False, "mosei_senti_data_noalign.pkl"),
    ("mosi", True, "mosi_data.pkl"), ("mosi", False, "mosi_data_noalign.pkl"),
])
def test_file_names(dataset, aligned, name):
    assert data_file("somewhere", dataset, aligned).as_posix() == f"somewhere/{name}"


def test_missing_file_says_where_and_how(tmp_path):
    with pytest.raises(DataError) as error:
        load_splits(tmp_path, "mosei_senti", aligned=False)
    message = str(error.value)
    assert str(tmp_path / "mosei_senti_data_noalign.pkl") in message
    assert "MulT" in message
    assert "python main.py make-data --dataset mosei_senti --unaligned" in message


def test_protocol_2_file_with_text_ids_loads(tmp_path, synthetic_data):
    # Older numpy/Python writers: protocol 2 (bytes via _codecs.encode) and ids stored as str.
    with open(data_file(synthetic_data("mosei_senti"), "mosei_senti"), "rb") as handle:
        data = pickle.load(handle)
    for part in data.values():
        part["id"] = part["id"].astype(str)
    data["test"]["id"] = data["test"]["id"][:, 0].astype(object)
    with open(data_file(tmp_path, "mosei_senti"), "wb") as handle:
        pickle.dump(data, handle, protocol=2)
    splits = load_splits(tmp_path, "mosei_senti")
    assert splits["train"].ids[0] == "/".join(data["train"]["id"][0])
    assert splits["test"].ids == list(data["test"]["id"])
