"""Reading the MulT pickles without letting a file run code.

A pickle can name any importable callable and have it called while loading, so an ordinary
`pickle.load` of a downloaded file is as dangerous as running a script from it. The data files hold
only dicts of numpy arrays, so the unpickler below resolves only the handful of globals that numpy
arrays, dtypes and scalars are rebuilt from, and refuses everything else before it is imported.

The admitted names were taken from what numpy 1.x and 2.x actually write at protocols 0-5:
- `numpy.ndarray`, `numpy.dtype`;
- `_reconstruct` (protocols 0-4) and `_frombuffer` (protocol 5), which build an array from its bytes;
- `scalar`, which builds a numpy scalar such as `np.float64(1.5)`;
- `_codecs.encode` and `builtins.bytes`: at protocols 0-2 Python 3 writes a bytes payload as
  `encode(text, "latin1")` and an empty one as `bytes()`.
numpy 2 moved `numpy.core` to `numpy._core`; files written by either major version name their own
spelling, so both are admitted and resolved to whichever module the installed numpy provides.

Admitting a name is not enough: called with other arguments than numpy's own pickling passes, some of
these allocate memory the file never supplies (`numpy.ndarray((10**5, 10**5), "f8")` is 80 GB of
uninitialised memory from a few bytes of pickle). So the array builders are wrapped, and every array
must be backed by the file:
- `numpy.ndarray` stands for the array type only; calling it is refused. `_reconstruct` must be given
  exactly what numpy writes, `(ndarray, (0,), b"b")`, an empty array that the pickle's BUILD step then
  fills with `__setstate__((version, shape, dtype, fortran, data))`, which numpy itself refuses unless
  len(data) is shape x itemsize.
- `_frombuffer(data, dtype, shape, order)` and `scalar(dtype, data)` are checked here the same way: the
  data must be bytes and hold exactly shape x itemsize (itemsize for a scalar) of them.
"""
from __future__ import annotations

import importlib
import math
import pickle
from pathlib import Path

import numpy as np

from ..errors import DataError

_NUMPY_CORE_MODULES = ("multiarray", "_multiarray_umath")
_ALLOWED: dict[tuple[str, str], tuple[tuple[str, ...], str]] = {}


def _admit(modules: tuple[str, ...], name: str, candidates: tuple[str, ...]) -> None:
    # Every spelling of the global maps to the modules to try, in order, when resolving it.
    for module in modules:
        _ALLOWED[(module, name)] = (candidates, name)


for _sub in _NUMPY_CORE_MODULES:
    _spellings = (f"numpy.core.{_sub}", f"numpy._core.{_sub}")
    _targets = (f"numpy._core.{_sub}", f"numpy.core.{_sub}")
    _admit(_spellings, "_reconstruct", _targets)
    _admit(_spellings, "scalar", _targets)
_admit(("numpy.core.numeric", "numpy._core.numeric"), "_frombuffer",
       ("numpy._core.numeric", "numpy.core.numeric"))
_admit(("numpy",), "ndarray", ("numpy",))
_admit(("numpy",), "dtype", ("numpy",))
# Protocol 0-2 pickles written by Python 3 use the Python 2 module name `__builtin__`.
_admit(("builtins", "__builtin__"), "bytes", ("builtins",))
_admit(("_codecs",), "encode", ("_codecs",))

ALLOWED_GLOBALS = frozenset(f"{module}.{name}" for module, name in _ALLOWED)


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that resolves only the globals numpy data needs (see ALLOWED_GLOBALS)."""

    def __init__(self, file, *, source: str = "<stream>"):
        # latin1 lets Python 2 era numpy pickles decode their raw byte payloads unchanged.
        super().__init__(file, encoding="latin1")
        self._source = source

    def find_class(self, module: str, name: str):
        found = self._resolve(module, name)
        if name == "ndarray":
            return _ArrayType(self._source)
        if name == "_reconstruct":
            return _checked_reconstruct(found, self._source)
        if name == "_frombuffer":
            return _checked_frombuffer(found, self._source)
        if name == "scalar":
            return _checked_scalar(found, self._source)
        return found

    def _resolve(self, module: str, name: str):
        entry = _ALLOWED.get((module, name))
        if entry is None:
            raise DataError(
                f"refusing to load {self._source}: it references the global '{module}.{name}', "
                f"which a MulT data file never contains (only numpy arrays, dtypes and scalars are "
                f"admitted). The file may be corrupt or malicious; do not load it with plain pickle."
            )
        candidates, attribute = entry
        # The numpy._core spelling is tried first: under numpy 2, importing numpy.core works but
        # warns that it is deprecated; under numpy 1.x only numpy.core exists.
        for candidate in candidates:
            try:
                return getattr(importlib.import_module(candidate), attribute)
            except (ImportError, AttributeError):
                continue
        raise DataError(f"cannot load {self._source}: the installed numpy provides no '{module}.{name}'")


class _ArrayType:
    """What the name `numpy.ndarray` resolves to: a token _reconstruct accepts, never a callable."""

    def __init__(self, source: str):
        self._source = source

    def __call__(self, *args, **kwargs):
        raise DataError(f"refusing to load {self._source}: it calls numpy.ndarray directly, which allocates an "
                        f"array of any declared size without data from the file; numpy never writes that. The "
                        f"file is corrupt or crafted.")


def _not_backed(source: str, what: str) -> DataError:
    return DataError(f"refusing to load {source}: {what}. numpy never writes that; the file is corrupt or crafted.")


def _checked_reconstruct(reconstruct, source: str):
    def build(subtype, shape, typecode):
        if not isinstance(subtype, _ArrayType) or tuple(shape) != (0,) or typecode not in (b"b", "b"):
            raise _not_backed(source, f"an array is reconstructed as {subtype!r}, {shape!r}, {typecode!r} instead "
                                      f"of numpy's (ndarray, (0,), b'b')")
        return reconstruct(np.ndarray, (0,), b"b")
    return build


def _declared_bytes(source: str, dtype, shape) -> int:
    if not isinstance(dtype, np.dtype):
        raise _not_backed(source, f"an array's dtype is a {type(dtype).__name__}")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise _not_backed(source, f"an array's shape is {shape!r}")
    return math.prod(shape) * dtype.itemsize  # Python ints: no overflow however large the claim


def _checked_frombuffer(frombuffer, source: str):
    def build(data, dtype, shape, order):
        expected = _declared_bytes(source, dtype, shape)
        if not isinstance(data, (bytes, bytearray)) or len(data) != expected:
            got = f"{len(data)} bytes" if isinstance(data, (bytes, bytearray)) else f"a {type(data).__name__}"
            raise _not_backed(source, f"an array of shape {shape} and dtype {dtype} needs {expected} bytes, the "
                                      f"file holds {got} for it")
        return frombuffer(data, dtype, shape, order)
    return build


def _checked_scalar(scalar, source: str):
    def build(dtype, *data):
        if not isinstance(dtype, np.dtype):
            raise _not_backed(source, f"a scalar's dtype is a {type(dtype).__name__}")
        if not dtype.hasobject:
            # Python 2 era files hold the bytes as a latin1-decoded str.
            payload = data[0] if len(data) == 1 and isinstance(data[0], (bytes, str)) else None
            if payload is None or len(payload) != dtype.itemsize:
                raise _not_backed(source, f"a {dtype} scalar needs {dtype.itemsize} bytes of data, the file "
                                          f"holds {len(payload) if payload is not None else 'none'}")
        return scalar(dtype, *data)
    return build


def safe_load(path: str | Path):
    """Unpickle a data file through RestrictedUnpickler.

    A refused global, a truncated file or a file that is not a pickle at all each raise DataError
    naming the file; the refused global is never imported, let alone called.
    """
    path = Path(path)
    try:
        handle = open(path, "rb", buffering=1 << 20)
    except OSError as exc:
        raise DataError(f"cannot open data file {path}: {exc.strerror or exc}") from None
    with handle:
        try:
            return RestrictedUnpickler(handle, source=str(path)).load()
        except DataError:
            raise
        except EOFError:
            raise DataError(_truncated_message(path)) from None
        except MemoryError:
            raise DataError(f"not enough memory to unpickle {path}") from None
        except (pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError,
                AttributeError, UnicodeDecodeError, OverflowError) as exc:
            if "truncated" in str(exc):
                raise DataError(_truncated_message(path)) from None
            raise DataError(
                f"{path} is not a readable pickle of numpy arrays ({type(exc).__name__}: {exc}). "
                f"Is it really a MulT data file? A truncated or corrupted file looks like this too."
            ) from None


def _truncated_message(path: Path) -> str:
    return (f"{path} ends too early: the pickle is truncated (an interrupted download or copy?). "
            f"Fetch or generate the file again.")
