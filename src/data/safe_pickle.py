"""Reading the MulT pickles without letting a file run code or claim memory it does not hold.

The data files hold only dicts of numpy arrays, so the restricted unpickler of src/safe_pickle.py is
given the table below: the handful of globals numpy arrays, dtypes and scalars are rebuilt from, each
resolved to a checked wrapper, and nothing else. The names were taken from what numpy 1.x and 2.x
actually write at protocols 0-5:
- `numpy.ndarray`, `numpy.dtype`;
- `_reconstruct` (protocols 0-4) and `_frombuffer` (protocol 5), which build an array from its bytes;
- `scalar`, which builds a numpy scalar such as `np.float64(1.5)`;
- `_codecs.encode` and `builtins.bytes`: at protocols 0-2 Python 3 writes a bytes payload as
  `encode(text, "latin1")` and an empty one as `bytes()`; only those calls are admitted.
numpy 2 moved `numpy.core` to `numpy._core`; files written by either major version name their own
spelling, so both are admitted and resolved to whichever module the installed numpy provides.

Admitting a name is not enough: called with other arguments than numpy's own pickling passes, some of
these allocate memory the file never supplies (`numpy.ndarray((10**5, 10**5), "f8")` is 80 GB from a few
bytes of pickle; `bytes(10**9)` is a gigabyte of zeros; one payload referenced a thousand times is a
thousand arrays). So every array must be backed by the file:
- `numpy.ndarray` stands for the array type only; calling it is refused. `_reconstruct` must be given
  exactly what numpy writes, `(ndarray, (0,), b"b")`, an empty array that the pickle's BUILD step then
  fills with `__setstate__((version, shape, dtype, fortran, data))`; numpy refuses it unless len(data) is
  shape x itemsize, and that size is charged to the file's size before numpy copies the data.
- `_frombuffer(data, dtype, shape, order)` and `scalar(dtype, data)` are checked the same way: the data
  must be bytes and hold exactly shape x itemsize (itemsize for a scalar) of them, charged likewise.
- Bytes decoded by `encode` are charged too, so the sum of what a file declares never exceeds its size.
"""
from __future__ import annotations

import importlib
import math
import pickle
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..safe_pickle import Factory, Marker, RestrictedUnpickler, empty_bytes, latin1_encode

# Containers of plain data: what a data file's arrays may sit in, however deep (a few levels in practice).
MAX_NESTING = 100


def _numpy_global(*candidates: str):
    """The first of `module.name` candidates the installed numpy provides. The numpy._core spelling is
    tried first: under numpy 2, importing numpy.core works but warns that it is deprecated."""
    for candidate in candidates:
        module, name = candidate.rsplit(".", 1)
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise DataError(f"the installed numpy provides none of {', '.join(candidates)}")


def _not_backed(unpickler, what: str) -> DataError:
    return unpickler.refuse(f"{what}. numpy never writes that; the file is corrupt or crafted")


class _ArrayType(Marker):
    """What `numpy.ndarray` resolves to: a token _reconstruct accepts, never a callable."""

    __slots__ = ()

    def __call__(self, *args, **kwargs):
        raise self._refuse("it calls numpy.ndarray directly, which allocates an array of any declared size "
                           "without data from the file; numpy never writes that. The file is corrupt or crafted")


def _declared_bytes(unpickler, dtype, shape) -> int:
    if not isinstance(dtype, np.dtype):
        raise _not_backed(unpickler, f"an array's dtype is a {type(dtype).__name__}")
    if not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise _not_backed(unpickler, f"an array's shape is {shape!r}")
    return math.prod(shape) * dtype.itemsize  # Python ints: no overflow however large the claim


class _PendingArray(np.ndarray):
    """The empty array `_reconstruct` returns: its __setstate__ checks and charges the declared size
    before numpy's copies the data. Turned into a plain ndarray view once the file is read."""

    _unpickler = None

    def __setstate__(self, state):
        unpickler = self._unpickler
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise _not_backed(unpickler, f"an array's state is a {type(state).__name__}")
        shape, dtype, _fortran, data = state[-4:]
        declared = _declared_bytes(unpickler, dtype, shape)
        if dtype.hasobject:
            # Object arrays hold a list of the file's own objects; each element takes at least a byte.
            if not isinstance(data, list) or len(data) != math.prod(shape):
                raise _not_backed(unpickler, f"an object array of shape {shape} is given {type(data).__name__}")
            declared = len(data)
        elif not isinstance(data, (bytes, str)) or len(data) != declared:
            got = f"{len(data)} bytes" if isinstance(data, (bytes, str)) else f"a {type(data).__name__}"
            raise _not_backed(unpickler, f"an array of shape {shape} and dtype {dtype} needs {declared} bytes, "
                                         f"the file holds {got} for it")
        unpickler.allocations.spend(declared, unpickler, f"an array of shape {shape} and dtype {dtype}")
        super().__setstate__(state)


def _checked_reconstruct(unpickler, qualname):
    reconstruct = _numpy_global(*_spellings(qualname))
    pending = type("ndarray", (_PendingArray,), {"_unpickler": unpickler})

    def build(subtype, shape, typecode):
        if not isinstance(subtype, _ArrayType) or tuple(shape) != (0,) or typecode not in (b"b", "b"):
            raise _not_backed(unpickler, f"an array is reconstructed as {subtype!r}, {shape!r}, {typecode!r} "
                                         f"instead of numpy's (ndarray, (0,), b'b')")
        return reconstruct(pending, (0,), b"b")
    return build


def _checked_frombuffer(unpickler, qualname):
    frombuffer = _numpy_global(*_spellings(qualname))

    def build(data, dtype, shape, order):
        expected = _declared_bytes(unpickler, dtype, shape)
        if not isinstance(data, (bytes, bytearray)) or len(data) != expected:
            got = f"{len(data)} bytes" if isinstance(data, (bytes, bytearray)) else f"a {type(data).__name__}"
            raise _not_backed(unpickler, f"an array of shape {shape} and dtype {dtype} needs {expected} bytes, "
                                         f"the file holds {got} for it")
        unpickler.allocations.spend(expected, unpickler, f"an array of shape {shape} and dtype {dtype}")
        return frombuffer(data, dtype, shape, order)
    return build


def _checked_scalar(unpickler, qualname):
    scalar = _numpy_global(*_spellings(qualname))

    def build(dtype, *data):
        if not isinstance(dtype, np.dtype):
            raise _not_backed(unpickler, f"a scalar's dtype is a {type(dtype).__name__}")
        if not dtype.hasobject:
            # Python 2 era files hold the bytes as a latin1-decoded str.
            payload = data[0] if len(data) == 1 and isinstance(data[0], (bytes, str)) else None
            if payload is None or len(payload) != dtype.itemsize:
                raise _not_backed(unpickler, f"a {dtype} scalar needs {dtype.itemsize} bytes of data, the file "
                                             f"holds {len(payload) if payload is not None else 'none'}")
            unpickler.allocations.spend(dtype.itemsize, unpickler, f"a {dtype} scalar")
        return scalar(dtype, *data)
    return build


def _spellings(qualname: str) -> tuple[str, ...]:
    """numpy 2 spelling first, then numpy 1's, of a numpy.core / numpy._core global."""
    rest = qualname.split(".", 2)[2]
    return f"numpy._core.{rest}", f"numpy.core.{rest}"


def _numpy_attribute(unpickler, qualname):
    return getattr(np, qualname.rsplit(".", 1)[1])


# The allow-list: what a data file may name, and what each name becomes. Extend it here (one line per
# global, with its factory) when a data format needs more.
NUMPY_GLOBALS: dict[str, Factory] = {}
for _core in ("numpy.core", "numpy._core"):
    for _sub in ("multiarray", "_multiarray_umath"):
        NUMPY_GLOBALS[f"{_core}.{_sub}._reconstruct"] = _checked_reconstruct
        NUMPY_GLOBALS[f"{_core}.{_sub}.scalar"] = _checked_scalar
    NUMPY_GLOBALS[f"{_core}.numeric._frombuffer"] = _checked_frombuffer
NUMPY_GLOBALS["numpy.ndarray"] = _ArrayType
NUMPY_GLOBALS["numpy.dtype"] = _numpy_attribute
NUMPY_GLOBALS["builtins.bytes"] = empty_bytes      # bytes() only
NUMPY_GLOBALS["_codecs.encode"] = latin1_encode    # (text, "latin1") only, charged to the file's size

ALLOWED_GLOBALS = frozenset(NUMPY_GLOBALS)


def _plain_arrays(obj, unpickler, depth: int = 0):
    """The loaded tree with every pending array as the plain ndarray numpy itself would have returned."""
    if isinstance(obj, _PendingArray):
        return obj.view(np.ndarray)
    if depth > MAX_NESTING:
        raise unpickler.refuse(f"its containers are nested more than {MAX_NESTING} deep; a data file holds "
                               "dicts of arrays")
    if isinstance(obj, dict):
        for key, value in obj.items():
            obj[key] = _plain_arrays(value, unpickler, depth + 1)
    elif isinstance(obj, list):
        obj[:] = [_plain_arrays(value, unpickler, depth + 1) for value in obj]
    elif isinstance(obj, tuple):
        obj = tuple(_plain_arrays(value, unpickler, depth + 1) for value in obj)
    return obj


def safe_load(path: str | Path):
    """Unpickle a data file through the restricted unpickler and the numpy allow-list.

    A refused global, a size the file does not back, a truncated file or a file that is not a pickle at
    all each raise DataError naming the file; the refused global is never imported, let alone called.
    """
    path = Path(path)
    source = str(path)

    def refuse(what: str) -> DataError:
        return DataError(f"refusing to load {source}: {what}. The file may be corrupt or malicious (a MulT data "
                         f"file holds only numpy arrays, dtypes and scalars); do not load it with plain pickle.")

    try:
        handle = open(path, "rb", buffering=1 << 20)
        size = path.stat().st_size
    except OSError as exc:
        raise DataError(f"cannot open data file {path}: {exc.strerror or exc}") from None
    with handle:
        unpickler = RestrictedUnpickler(handle, admitted=NUMPY_GLOBALS, refuse=refuse, file_size=size)
        try:
            return _plain_arrays(unpickler.load(), unpickler)
        except DataError:
            raise
        except EOFError:
            raise DataError(_truncated_message(path)) from None
        except MemoryError:
            raise DataError(f"not enough memory to unpickle {path}") from None
        except (pickle.UnpicklingError, ValueError, TypeError, KeyError, IndexError,
                AttributeError, UnicodeDecodeError, OverflowError, RecursionError) as exc:
            if "truncated" in str(exc):
                raise DataError(_truncated_message(path)) from None
            raise DataError(
                f"{path} is not a readable pickle of numpy arrays ({type(exc).__name__}: {exc}). "
                f"Is it really a MulT data file? A truncated or corrupted file looks like this too."
            ) from None


def _truncated_message(path: Path) -> str:
    return (f"{path} ends too early: the pickle is truncated (an interrupted download or copy?). "
            f"Fetch or generate the file again.")
