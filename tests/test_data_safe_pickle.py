"""The restricted unpickler: everything numpy data needs loads, anything else is refused unrun."""
import os
import pickle

import numpy as np
import pytest

from src.data.safe_pickle import ALLOWED_GLOBALS, safe_load
from src.errors import DataError, UserError

SAMPLE = {
    "train": {
        "float64": np.random.default_rng(0).standard_normal((3, 4, 2)),
        "float32": np.arange(6, dtype=np.float32).reshape(2, 3),
        "bytes": np.array([[b"abc", b"", b"x"]]),
        "str": np.array(["utterance", "b"]),
        "empty": np.zeros((0, 2)),
        "fortran": np.asfortranarray(np.ones((2, 3))),
        "strided": np.arange(10.0)[::2],
        "special": np.array([-np.inf, np.nan, np.inf]),
        "scalar": np.float64(1.5),
        "integer": np.int64(-3),
        "plain": ["text", b"raw", b"", 1, 2.5, None, True, (1, 2)],
    }
}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_content_loads_at_every_protocol(tmp_path, protocol):
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps(SAMPLE, protocol=protocol))
    loaded = safe_load(path)["train"]
    for key, expected in SAMPLE["train"].items():
        got = loaded[key]
        assert type(got) is type(expected), key
        if isinstance(expected, np.ndarray):
            assert got.dtype == expected.dtype and got.shape == expected.shape
            assert np.array_equal(got, expected, equal_nan=expected.dtype.kind == "f"), key
        else:
            assert got == expected, key


class _CreatesFile:
    def __init__(self, func, path):
        self.func, self.path = func, path

    def __reduce__(self):
        if self.func == "system":
            return os.system, (f"touch {self.path}",)
        return open, (str(self.path), "w")


# The global is written under the callable's defining module: posix.system, io.open.
@pytest.mark.parametrize("func, global_name", [("system", ".system'"), ("open", ".open'")])
def test_malicious_pickle_is_refused_before_running(tmp_path, func, global_name):
    victim = tmp_path / "created-by-pickle"
    path = tmp_path / "iemocap_data.pkl"
    path.write_bytes(pickle.dumps({"train": {"text": _CreatesFile(func, victim)}}, protocol=2))
    with pytest.raises(DataError) as error:
        safe_load(path)
    assert not victim.exists()
    message = str(error.value)
    assert global_name in message and str(path) in message, message
    assert isinstance(error.value, UserError)


def test_truncated_pickle(tmp_path):
    path = tmp_path / "mosi_data.pkl"
    payload = pickle.dumps(SAMPLE, protocol=4)
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(DataError, match="truncated") as error:
        safe_load(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize("content", [b"not a pickle at all\n", b"\x89PNG\r\n\x1a\n" + bytes(40), b""])
def test_non_pickle_file(tmp_path, content):
    path = tmp_path / "mosi_data.pkl"
    path.write_bytes(content)
    with pytest.raises(DataError) as error:
        safe_load(path)
    assert str(path) in str(error.value)


def test_whitelist_is_only_numpy_and_byte_helpers():
    for name in ALLOWED_GLOBALS:
        module = name.rsplit(".", 1)[0]
        assert module.split(".")[0] in ("numpy", "_codecs", "builtins", "__builtin__"), name
    assert "builtins.eval" not in ALLOWED_GLOBALS and "builtins.getattr" not in ALLOWED_GLOBALS
