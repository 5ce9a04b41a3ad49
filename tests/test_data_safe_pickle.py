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


# ------------------------------------------------------------------ arrays must be backed by the file
class _Reduces:
    """Pickles as whatever __reduce__ returns: the crafted calls a malicious file could hold."""

    def __init__(self, *reduction):
        self.reduction = reduction

    def __reduce__(self):
        return self.reduction


_reconstruct = np._core.multiarray._reconstruct if hasattr(np, "_core") else np.core.multiarray._reconstruct
_frombuffer = np._core.numeric._frombuffer if hasattr(np, "_core") else np.core.numeric._frombuffer
_scalar = np._core.multiarray.scalar if hasattr(np, "_core") else np.core.multiarray.scalar
HUGE = (100_000, 100_000)  # 40 GB of float32 if it were ever allocated

CRAFTED = {
    "ndarray called directly": (_Reduces(np.ndarray, (HUGE, np.dtype("f4"))), "calls numpy.ndarray directly"),
    "reconstruct with a real shape": (_Reduces(_reconstruct, (np.ndarray, HUGE, b"b")), "instead of numpy's"),
    "setstate payload too short": (
        _Reduces(_reconstruct, (np.ndarray, (0,), b"b"), (1, HUGE, np.dtype("f4"), False, b"abcd")),
        "needs 40000000000 bytes, the file holds 4 bytes"),
    "setstate payload one byte long": (
        _Reduces(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2, 3), np.dtype("f4"), False, bytes(24 + 1))),
        "needs 24 bytes, the file holds 25 bytes"),
    "frombuffer payload too short": (_Reduces(_frombuffer, (b"abcd", np.dtype("f4"), HUGE, "C")),
                                     "needs 40000000000 bytes"),
    "frombuffer shape not a tuple of ints": (_Reduces(_frombuffer, (b"abcd", np.dtype("f4"), "x", "C")), "shape"),
    "scalar without data": (_Reduces(_scalar, (np.dtype("V100000000"),)), "needs 100000000 bytes"),
    "scalar with too little data": (_Reduces(_scalar, (np.dtype("f8"), b"ab")), "needs 8 bytes"),
}


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("case", list(CRAFTED))
def test_arrays_not_backed_by_the_file_are_refused(tmp_path, case, protocol):
    payload, fragment = CRAFTED[case]
    path = tmp_path / "iemocap_data.pkl"
    path.write_bytes(pickle.dumps({"train": {"text": payload}}, protocol=protocol))
    assert path.stat().st_size < 1000
    with pytest.raises(DataError) as error:
        safe_load(path)
    assert str(path) in str(error.value) and fragment in str(error.value), str(error.value)


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_backed_arrays_written_by_hand_like_numpy_still_load(tmp_path, protocol):
    # The same builders with numpy's own arguments: what the checks must keep admitting.
    data = np.arange(6, dtype=np.float32).tobytes()
    good = {"reconstruct": _Reduces(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2, 3), np.dtype("f4"), False, data)),
            "frombuffer": _Reduces(_frombuffer, (data, np.dtype("f4"), (2, 3), "C")),
            "scalar": _Reduces(_scalar, (np.dtype("f4"), data[4:8]))}
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps(good, protocol=protocol))
    loaded = safe_load(path)
    expected = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(loaded["reconstruct"], expected) and np.array_equal(loaded["frombuffer"], expected)
    assert type(loaded["reconstruct"]) is np.ndarray and loaded["scalar"] == np.float32(1.0)


# ------------------------------------------------------------------ sizes a file declares but does not hold
def _refusal(tmp_path, payload, protocol=2):
    path = tmp_path / "iemocap_data.pkl"
    path.write_bytes(pickle.dumps({"train": {"text": payload}}, protocol=protocol))
    with pytest.raises(DataError) as error:
        safe_load(path)
    assert str(path) in str(error.value)
    return str(error.value)


def test_bytes_of_a_declared_size_are_refused(tmp_path):
    # bytes(N) makes N bytes from a few bytes of pickle; numpy only ever writes bytes().
    assert "only bytes() or a copy" in _refusal(tmp_path, _Reduces(bytes, (10 ** 9,)))


def test_encode_with_another_codec_is_refused(tmp_path):
    import codecs

    assert "pickle only ever writes (text, 'latin1')" in _refusal(tmp_path, _Reduces(codecs.encode, ("ab", "utf-32")))


@pytest.mark.parametrize("protocol", [2, 4, 5])
@pytest.mark.parametrize("builder", ["reconstruct", "frombuffer"])
def test_one_payload_backing_many_arrays_is_refused(tmp_path, builder, protocol):
    # The payload is pickled once and referenced from the memo 1000 times: 10 MB of arrays from a 20 kB file.
    data = np.arange(2500, dtype=np.float32).tobytes()
    if builder == "reconstruct":
        arrays = [_Reduces(_reconstruct, (np.ndarray, (0,), b"b"), (1, (2500,), np.dtype("f4"), False, data))
                  for _ in range(1000)]
    else:
        arrays = [_Reduces(_frombuffer, (data, np.dtype("f4"), (2500,), "C")) for _ in range(1000)]
    assert "more than the" in _refusal(tmp_path, arrays, protocol)


def test_one_text_decoded_many_times_is_refused(tmp_path):
    import codecs

    text = "x" * 10_000
    # The text is pickled once and referenced from the memo: each call would decode it again.
    assert "copied or decoded bytes" in _refusal(tmp_path, [_Reduces(codecs.encode, (text, "latin1"))
                                                            for _ in range(100)])
