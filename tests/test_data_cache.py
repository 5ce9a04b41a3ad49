"""The float32 cache: reused when valid, rebuilt when stale or torn, never trusted half-written."""
import json
import os
import pickle

import numpy as np
import pytest
import torch

import src.data.cache as cache_module
from src.data import load_splits, write_synthetic
from src.errors import DataError


def _forbid_unpickling(monkeypatch):
    def refuse(path):
        raise AssertionError(f"the pickle {path} was read although the cache is valid")
    monkeypatch.setattr(cache_module, "safe_load", refuse)


def _count_unpickling(monkeypatch):
    calls = []
    real = cache_module.safe_load

    def counting(path):
        calls.append(path)
        return real(path)
    monkeypatch.setattr(cache_module, "safe_load", counting)
    return calls


@pytest.fixture
def tiny(tmp_path):
    path = write_synthetic(tmp_path, "iemocap", scale=0.0005)
    first = load_splits(tmp_path, "iemocap")
    return tmp_path, path, path.with_name(path.name + ".cache"), first


def test_cache_layout_and_manifest(tiny):
    _, path, cache_dir, first = tiny
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    stat = path.stat()
    assert manifest["source"]["size"] == stat.st_size and manifest["source"]["mtime_ns"] == stat.st_mtime_ns
    assert len(manifest["source"]["sha1"]) == 40
    entry = manifest["arrays"]["train/audio"]
    assert entry["dtype"] == "float32" and entry["shape"] == [4, 20, 74]
    assert entry["bytes"] == (cache_dir / entry["file"]).stat().st_size
    assert entry["crc32"] == cache_module.data_crc32(cache_dir / entry["file"])
    values = np.load(cache_dir / entry["file"])
    assert entry["crc32"] == __import__("zlib").crc32(values.tobytes())  # the values, not the header
    assert sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith(".")) == sorted(
        [f"{s}.{k}.npy" for s in ("train", "valid", "test") for k in ("text", "audio", "vision", "labels")]
        + ["manifest.json"])
    assert isinstance(first["train"]._arrays()["text"], np.memmap)


def test_second_load_reuses_the_cache(tiny, monkeypatch):
    data_dir, _, _, first = tiny
    _forbid_unpickling(monkeypatch)
    again = load_splits(data_dir, "iemocap")
    assert torch.equal(again["test"][2]["audio"], first["test"][2]["audio"])


def test_changed_source_is_rebuilt(tiny, monkeypatch):
    data_dir, path, _, first = tiny
    before = first["train"][0]["text"]
    write_synthetic(data_dir, "iemocap", scale=0.0005, seed=1)
    calls = _count_unpickling(monkeypatch)
    rebuilt = load_splits(data_dir, "iemocap")
    assert len(calls) == 1
    assert not torch.equal(rebuilt["train"][0]["text"], before)


def test_touched_source_with_same_size_is_rebuilt(tiny, monkeypatch):
    data_dir, path, _, _ = tiny
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    calls = _count_unpickling(monkeypatch)
    load_splits(data_dir, "iemocap")
    assert len(calls) == 1


@pytest.mark.parametrize("damage", ["no manifest", "truncated npy", "missing npy", "reshaped npy", "bad manifest",
                                    "value edited in place", "one flipped bit"])
def test_torn_cache_is_rebuilt(tiny, monkeypatch, damage):
    data_dir, _, cache_dir, first = tiny
    target = cache_dir / "valid.vision.npy"
    # Read before the damage, from the cache as it is now (`first` memory-maps files an earlier case replaced).
    expected = load_splits(data_dir, "iemocap")["valid"][1]["vision"].clone()
    if damage == "no manifest":
        (cache_dir / "manifest.json").unlink()
    elif damage == "truncated npy":
        with open(target, "r+b") as handle:
            handle.truncate(target.stat().st_size - 100)
    elif damage == "missing npy":
        target.unlink()
    elif damage == "reshaped npy":
        # Same byte count, different shape: only the header check can tell.
        array = np.load(target)
        np.save(target, array.reshape(array.shape[0], -1, 7))
    elif damage == "value edited in place":
        # Same size, shape and dtype: only the checksum of the values can tell.
        array = np.load(target, mmap_mode="r+")
        array[1, 0, 0] += 1.0
        array.flush()
        del array
    elif damage == "one flipped bit":
        raw = bytearray(target.read_bytes())
        raw[-1] ^= 0x01
        target.write_bytes(bytes(raw))
    else:
        (cache_dir / "manifest.json").write_text("{ not json")
    calls = _count_unpickling(monkeypatch)
    rebuilt = load_splits(data_dir, "iemocap")
    assert len(calls) == 1
    assert torch.equal(rebuilt["valid"][1]["vision"], expected)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["arrays"]["valid/vision"]["shape"] == [4, 20, 35]


def test_failed_conversion_leaves_no_trusted_cache(tmp_path):
    path = write_synthetic(tmp_path, "mosi", scale=0.0005)
    with open(path, "rb") as handle:
        data = pickle.load(handle)
    data["test"]["vision"][0, -1, 0] = np.nan
    with open(path, "wb") as handle:
        pickle.dump(data, handle)
    with pytest.raises(DataError):
        load_splits(tmp_path, "mosi")
    cache_dir = path.with_name(path.name + ".cache")
    assert not (cache_dir / "manifest.json").exists()
    assert not list(cache_dir.glob("*.npy"))


def test_unwritable_data_dir_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    data_dir = tmp_path / "readonly"
    write_synthetic(data_dir, "mosi", scale=0.0005)
    beside = data_dir / "mosi_data.pkl.cache"
    real = cache_module._writable_dir
    monkeypatch.setattr(cache_module, "_writable_dir", lambda d: d != beside and real(d))
    monkeypatch.setenv("CAUSALMER_CACHE_DIR", str(tmp_path / "user-cache"))

    first = load_splits(data_dir, "mosi")
    assert not beside.exists()
    manifests = list((tmp_path / "user-cache").glob("mosi_data.pkl-*/manifest.json"))
    assert len(manifests) == 1
    _forbid_unpickling(monkeypatch)
    again = load_splits(data_dir, "mosi")
    assert torch.equal(again["train"][0]["text"], first["train"][0]["text"])


def test_nothing_writable_is_a_clear_error(tmp_path, monkeypatch):
    write_synthetic(tmp_path, "mosi", scale=0.0005)
    monkeypatch.setattr(cache_module, "_writable_dir", lambda d: False)
    with pytest.raises(DataError, match="CAUSALMER_CACHE_DIR"):
        load_splits(tmp_path, "mosi")


@pytest.mark.slow
def test_processes_starting_together_on_a_new_file_share_one_build(tmp_path):
    """DDP ranks or parallel runs that open a new pickle at once: one builds, the others wait and reuse."""
    import subprocess
    import sys
    import time
    from pathlib import Path

    data_dir, marks = tmp_path / "data", tmp_path / "marks"
    marks.mkdir()
    write_synthetic(data_dir, "iemocap", aligned=True, scale=0.02, seed=0)
    repo = Path(__file__).resolve().parents[1]
    # Every process starts loading at the same moment; a build leaves a mark and records whether
    # another build was running meanwhile.
    script = """
import os, sys, time
from pathlib import Path
import numpy as np
import src.data.cache as cache
from src.data import load_splits

data_dir, marks, start = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
build = cache._build

def watched_build(*args, **kwargs):
    mine = marks / f"building.{os.getpid()}"
    mine.touch()
    time.sleep(0.5)
    overlap = [m.name for m in marks.glob("building.*") if m != mine]
    result = build(*args, **kwargs)
    (marks / f"built.{os.getpid()}").write_text(",".join(overlap))
    mine.unlink()
    return result

cache._build = watched_build
time.sleep(max(0.0, start - time.time()))
splits = load_splits(data_dir, "iemocap")
print(len(splits["train"]), float(np.asarray(splits["train"].get_batch(np.arange(4))["audio"]).sum()))
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
    start = time.time() + 4.0
    procs = [subprocess.Popen([sys.executable, "-c", script, str(data_dir), str(marks), str(start)], cwd=repo,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [proc.communicate(timeout=300) + (proc.returncode,) for proc in procs]
    for out, err, code in results:
        assert code == 0, err[-2000:]
    assert len({out for out, _, _ in results}) == 1  # every process read the same arrays
    builds = list(marks.glob("built.*"))
    assert len(builds) == 1, [b.read_text() for b in builds]  # one build; the others reused it
    assert builds[0].read_text() == ""  # and nobody else was building at the same time


@pytest.mark.parametrize("order", ["C", "F"])
def test_checksum_is_of_the_values_in_file_order(tmp_path, order):
    # A pickle may hold Fortran-ordered arrays; the checksum must be of the bytes as the .npy stores them.
    source = np.asarray(np.random.default_rng(0).standard_normal((5, 4, 3)), order=order)
    entry, _ = cache_module._convert(source, tmp_path / "a.npy", audio=False, clean=False)
    assert entry["crc32"] == cache_module.data_crc32(tmp_path / "a.npy")
    assert np.array_equal(np.load(tmp_path / "a.npy"), source.astype(np.float32))
