"""Files written by torch.save, read without running them and without allocating what they do not hold.

A checkpoint of a whole model (`torch.save(model)`, as the published code writes them) names its classes
and needs their source to unpickle; `torch.load` on a downloaded one is as dangerous as running a script
from it, and `weights_only=True` refuses it outright. Here the pickle is read by the restricted unpickler
of src/safe_pickle.py with the allow-list below:
- a class of the model's code, of torch.nn, of ALBERT or of torchvision's ResNet -> an inert `Record`
  (its class name and pickled attribute dict);
- torch's tensor and storage rebuilders, `set`, `OrderedDict`, `torch.Size`, `torch.device` -> our own
  functions, which accept only the arguments torch writes;
- torch dtypes and storage types -> the dtypes; `torch.Tensor`, `Parameter` -> markers.
Any other global is refused before anything is called. The result must be a tree of records, tensors,
plain containers and scalars, and each tensor must be the one our rebuilder made (a BUILD step on it
would change it).

Sizes: every storage is charged to the file's size before it is read (zip members or the legacy file's
tail), every tensor must lie inside its storage without overlapping itself (a stride-0 view would make a
huge tensor of one element), and declared byte counts are checked against the bytes that remain before
anything is allocated. Module graphs are walked with explicit stacks, so a module containing itself or a
chain thousands deep is an error message, not a RecursionError.
"""
from __future__ import annotations

import io
import pickle
import pickletools
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import CheckpointError
from ..safe_pickle import Marker, Record, RestrictedUnpickler, function, latin1_encode, marker, record_class

# Packages whose classes may appear in a whole-model checkpoint; an instance of any of them becomes a Record.
# Nothing is ever imported from them.
RECORD_PACKAGES = ("src", "modules", "torch.nn.modules", "transformers.models.albert", "transformers.activations",
                   "torchvision.models.resnet")

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64, "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}
DTYPE_NAMES = ("float32", "float", "float64", "double", "float16", "half", "bfloat16", "int64", "long", "int32",
               "int", "int16", "short", "int8", "uint8", "bool", "complex64", "complex128")

# nn.Module's hook tables: a pickled module with a hook in one would not give its plain state_dict.
HOOK_TABLES = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class RefusedCheckpoint(CheckpointError):
    """A checkpoint holds something other than a module tree of tensors and plain data."""


def refusal(source: str):
    def refuse(what: str) -> RefusedCheckpoint:
        return RefusedCheckpoint(
            f"refusing to read {source}: {what}. A checkpoint of a model holds only its model classes, torch "
            "layers, tensors and plain data; this file may be corrupt or malicious (do not open it with "
            "torch.load(weights_only=False)). Nothing from it was run.")
    return refuse


class Storage:
    """A storage's bytes, typed; tensors are views into `flat`."""

    __slots__ = ("flat",)

    def __init__(self, flat: torch.Tensor):
        self.flat = flat

    def __setstate__(self, state):
        raise ValueError("a storage is given state")


# ------------------------------------------------------------------------------------------ tensors
def _tensor_from_storage(unpickler, storage, offset, size, stride) -> torch.Tensor:
    refuse = unpickler.refuse
    if not isinstance(storage, Storage):
        raise refuse(f"a tensor is rebuilt from {type(storage).__name__}, not from a storage")
    if not (isinstance(offset, int) and isinstance(size, (tuple, list, torch.Size))
            and isinstance(stride, (tuple, list)) and len(size) == len(stride) and offset >= 0
            and all(isinstance(s, int) and s >= 0 for s in (*size, *stride))):
        raise refuse(f"a tensor has a malformed layout (offset {offset!r}, size {size!r}, stride {stride!r})")
    numel = storage.flat.numel()
    elements = 1
    for n in size:
        elements *= n
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if elements else 0
    if extent > numel:
        raise refuse(f"a tensor of size {tuple(size)} reaches element {extent} of a storage of {numel}")
    # A tensor of more elements than its storage holds overlaps itself (a zero stride, an expanded view):
    # torch.save never writes a model's weights so, and it would make any declared size from a few bytes.
    if elements > numel:
        raise refuse(f"a tensor of size {tuple(size)} ({elements} elements) views a storage of {numel} elements")
    tensor = storage.flat.as_strided(tuple(size), tuple(stride), offset)
    unpickler.tensors[id(tensor)] = (tensor, tuple(size), tuple(stride), offset)
    return tensor


def _plain_state(unpickler, state, what: str) -> None:
    if state is None:
        return
    if not isinstance(state, dict) or any(not isinstance(v, (bool, int, float, str, type(None))) for v in state.values()):
        raise unpickler.refuse(f"{what} carries state other than plain flags: {state!r}")


def _no_hooks(unpickler, hooks) -> None:
    if hooks not in (None, {}) and not (isinstance(hooks, OrderedDict) and not hooks):
        raise unpickler.refuse("a tensor carries backward hooks")


def _rebuild_tensor_v2(unpickler):
    def rebuild(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
        _no_hooks(unpickler, hooks)
        _plain_state(unpickler, metadata, "a tensor")
        return _tensor_from_storage(unpickler, storage, offset, size, stride)
    return rebuild


def _rebuild_tensor(unpickler):
    return lambda storage, offset, size, stride: _tensor_from_storage(unpickler, storage, offset, size, stride)


def _rebuild_parameter(unpickler):
    def rebuild(data, requires_grad, hooks, state=None):
        if not isinstance(data, torch.Tensor) or id(data) not in unpickler.tensors or not isinstance(requires_grad, bool):
            raise unpickler.refuse("a parameter is rebuilt from something other than a tensor")
        _no_hooks(unpickler, hooks)
        _plain_state(unpickler, state, "a parameter")
        return _registered(unpickler, torch.nn.Parameter(data, requires_grad=requires_grad))
    return rebuild


def _registered(unpickler, tensor: torch.Tensor) -> torch.Tensor:
    unpickler.tensors[id(tensor)] = (tensor, tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())
    return tensor


def _rebuild_from_type_v2(unpickler):
    def rebuild(func, new_type, args, state):
        if func is not unpickler.find_class("torch._utils", "_rebuild_tensor_v2"):
            raise unpickler.refuse(f"_rebuild_from_type_v2 is asked to call {func!r}")
        if not (isinstance(new_type, Marker) and new_type.value in ("tensor", "parameter")):
            raise unpickler.refuse(f"_rebuild_from_type_v2 is asked to make a {new_type!r}")
        if not isinstance(args, tuple):
            raise unpickler.refuse("_rebuild_from_type_v2 is given no argument tuple")
        _plain_state(unpickler, state, "a tensor")  # e.g. transformers' `persistent` flag on buffers
        tensor = func(*args)
        if new_type.value == "parameter":
            return _registered(unpickler, torch.nn.Parameter(tensor, requires_grad=False))
        return tensor
    return rebuild


def _container(kind):
    def make(unpickler):
        def build(items=()):
            if not isinstance(items, (list, tuple)):
                raise unpickler.refuse(f"a {kind.__name__} is built from {type(items).__name__}")
            return kind(items)
        return build
    return function(make)


def _size(unpickler):
    def build(dims=()):
        if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
            raise unpickler.refuse(f"torch.Size is built from {dims!r}")
        return torch.Size(dims)
    return build


def _device(unpickler):
    def build(*spec):
        if not 1 <= len(spec) <= 2 or not all(isinstance(s, (str, int)) for s in spec):
            raise unpickler.refuse(f"torch.device is built from {spec!r}")
        return torch.device(*spec)
    return build


def _dtype(unpickler, qualname):
    return getattr(torch, qualname.rsplit(".", 1)[1])


# The allow-list of whole-model checkpoints: what a torch.save file may name, and what each name becomes.
TORCH_GLOBALS = {
    "torch._utils._rebuild_tensor_v2": function(_rebuild_tensor_v2),
    "torch._utils._rebuild_tensor": function(_rebuild_tensor),
    "torch._utils._rebuild_parameter": function(_rebuild_parameter),
    "torch._utils._rebuild_parameter_with_state": function(_rebuild_parameter),
    "torch._tensor._rebuild_from_type_v2": function(_rebuild_from_type_v2),
    "builtins.set": _container(set), "builtins.frozenset": _container(frozenset),
    "collections.OrderedDict": _container(OrderedDict),
    "torch.Size": function(_size), "torch.device": function(_device),
    "_codecs.encode": latin1_encode,  # protocol 2 writes bytes as encode(text, "latin1")
    "torch.Tensor": marker("tensor"), "torch.nn.parameter.Parameter": marker("parameter"),
    **{f"torch.{name}": marker(dtype) for name, dtype in STORAGE_DTYPES.items()},
    **{f"torch.{name}": _dtype for name in DTYPE_NAMES},
    **{f"{package}.*": record_class for package in RECORD_PACKAGES},
}


# ------------------------------------------------------------------------------------------ the unpickler
class TorchUnpickler(RestrictedUnpickler):
    """The restricted unpickler with TORCH_GLOBALS, storages from `load_storage(key, dtype, numel)`."""

    def __init__(self, data: bytes, source: str, file_size: int, load_storage=None):
        # Lengths declared inside the pickle are checked against the bytes that follow before the C
        # unpickler allocates them (it would allocate a declared 2**40-byte string before reading it).
        _check_declared_lengths(data, refusal(source))
        super().__init__(io.BytesIO(data), admitted=TORCH_GLOBALS, refuse=refusal(source), file_size=file_size,
                         encoding="utf-8", storage=self._storage)
        self.source = source
        self.load_storage = load_storage
        self.tensors: dict[int, tuple] = {}

    def _storage(self, pid):
        if not (isinstance(pid, tuple) and pid):
            raise self.refuse(f"it holds the persistent id {pid!r}")
        if pid[0] == "module" and len(pid) == 4 and isinstance(pid[1], type) and issubclass(pid[1], Record):
            return pid[1]  # the legacy format names each module class with its source; the source is ignored
        if pid[0] != "storage" or len(pid) not in (5, 6) or self.load_storage is None:
            raise self.refuse(f"it holds the persistent id {pid[0]!r}")
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) == 6 and pid[5] is not None:
            raise self.refuse("it holds a storage view (a torch before 1.0 wrote those): not supported")
        if not (isinstance(storage_type, Marker) and isinstance(storage_type.value, torch.dtype)):
            raise self.refuse(f"a storage has the type {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise self.refuse(f"a storage has the key {key!r} and size {numel!r}")
        return self.load_storage(key, storage_type.value, numel)


def _check_declared_lengths(data: bytes, refuse) -> None:
    """Walk the opcodes without building anything: pickletools reads each declared string or bytes
    length from the data itself and stops at the first that runs past its end."""
    try:
        for _ in pickletools.genops(io.BytesIO(data)):
            pass
    except ValueError as err:
        raise refuse(f"it is truncated or declares a size its bytes do not hold ({err})") from None


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _typed(data: bytes, dtype: torch.dtype, numel: int, order: str, source: str) -> torch.Tensor:
    size = _element_size(dtype)
    if len(data) < numel * size:
        raise CheckpointError(f"{source} is truncated or corrupt: a storage holds {len(data)} bytes, "
                              f"{numel * size} expected")
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    raw = torch.frombuffer(bytearray(data[: numel * size]), dtype=torch.uint8)
    if order == "big" and size > 1:
        raw = raw.view(numel, size).flip(1).reshape(-1).contiguous()
    elif order not in ("little", "big"):
        raise CheckpointError(f"{source} has an unknown byte order record {order!r}")
    return raw.view(dtype)


# ------------------------------------------------------------------------------------------ file formats
def _load_zip(path: Path, source: str, file_size: int):
    with zipfile.ZipFile(path) as archive:
        infos = {info.filename: info for info in archive.infolist()}
        pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{source} is a zip file but not one torch.save wrote (no single <name>/data.pkl)")
        # torch.save stores its members uncompressed: a compressed member could expand to any size.
        packed = [n for n, info in infos.items() if info.compress_type != zipfile.ZIP_STORED or info.file_size > file_size]
        if packed:
            raise CheckpointError(f"{source} is a zip file but not one torch.save wrote: {packed[0]} is compressed "
                                  "or larger than the file")
        prefix = pickles[0][: -len("data.pkl")]
        order = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in infos else "little"
        storages = {}
        unpickler = None

        def load_storage(key, dtype, numel):
            if key not in storages:
                record = f"{prefix}data/{key}"
                if record not in infos:
                    raise CheckpointError(f"{source} is truncated or corrupt: its storage {key} is missing")
                needed = numel * _element_size(dtype)
                if infos[record].file_size < needed:
                    raise CheckpointError(f"{source} is truncated or corrupt: its storage {key} holds "
                                          f"{infos[record].file_size} bytes, {needed} declared")
                unpickler.allocations.spend(needed, unpickler, f"storage {key}")
                storages[key] = Storage(_typed(archive.read(record), dtype, numel, order, source))
            return storages[key]

        unpickler = TorchUnpickler(archive.read(pickles[0]), source, file_size, load_storage)
        return unpickler.load(), unpickler


def _load_legacy(path: Path, source: str, file_size: int):
    """torch.save(..., _use_new_zipfile_serialization=False): magic number, protocol, system info, the
    object pickle, the list of storage keys, then each storage as an int64 element count and its bytes.

    The bytes come after the object pickle, so it is read twice: once to learn the storages (tensors
    then view shape-only `meta` placeholders), and once more with the bytes."""
    content = path.read_bytes()
    position = [0]

    def plain(load_storage=None):
        # One pickle of the sequence, starting where the previous one ended.
        end = _pickle_end(content, position[0], source)
        unpickler = TorchUnpickler(content[position[0]:end], source, file_size, load_storage)
        result = unpickler.load()
        return result, unpickler, end

    try:
        magic, _, position[0] = plain()
    except RefusedCheckpoint:
        raise
    except Exception:
        raise CheckpointError(f"{source} is neither a zip nor a legacy file written by torch.save") from None
    if magic != LEGACY_MAGIC:
        raise CheckpointError(f"{source} is neither a zip nor a legacy file written by torch.save "
                              "(a torch older than 1.0 wrote tar files: not supported)")
    _, _, position[0] = plain()  # protocol version
    info, _, position[0] = plain()
    if isinstance(info, dict) and info.get("little_endian") is False:
        raise CheckpointError(f"{source} was written on a big-endian machine: not supported")
    start = position[0]
    wanted = {}

    def placeholder(key, dtype, numel):
        if key not in wanted:
            wanted[key] = (dtype, numel, Storage(torch.empty(numel, dtype=dtype, device="meta")))
        return wanted[key][2]

    _, _, position[0] = plain(placeholder)
    keys, _, offset = plain()
    if not isinstance(keys, list) or set(keys) != set(wanted):
        raise CheckpointError(f"{source} is corrupt: its storage list does not match its tensors")
    storages = {}
    for key in keys:
        dtype, numel, _ = wanted[key]
        needed = numel * _element_size(dtype)
        header = content[offset:offset + 8]
        if len(header) < 8 or struct.unpack("<q", header)[0] != numel or offset + 8 + needed > len(content):
            raise CheckpointError(f"{source} is truncated or corrupt at storage {key} (it declares {numel} elements)")
        storages[key] = Storage(_typed(content[offset + 8:offset + 8 + needed], dtype, numel, "little", source))
        offset += 8 + needed
    position[0] = start
    root, unpickler, _ = plain(lambda key, dtype, numel: storages[key])
    return root, unpickler


def _pickle_end(content: bytes, start: int, source: str) -> int:
    """Where the pickle starting at `start` ends (after its STOP opcode)."""
    stream = io.BytesIO(content)
    stream.seek(start)
    try:
        for opcode, _, _ in pickletools.genops(stream):
            if opcode.name == "STOP":
                return stream.tell()
    except ValueError as err:
        raise refusal(source)(f"it is truncated or declares a size its bytes do not hold ({err})") from None
    raise CheckpointError(f"{source} is truncated: a pickle has no end")


def read_torch_file(path) -> object:
    """The object a torch.save file holds, read through the allow-list and validated as a tree of records,
    tensors, plain containers and scalars."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        file_size = path.stat().st_size
        if zipfile.is_zipfile(path):
            root, unpickler = _load_zip(path, source, file_size)
        else:
            root, unpickler = _load_legacy(path, source, file_size)
    except CheckpointError:
        raise
    except MemoryError:
        raise CheckpointError(f"{source}: not enough memory to read it") from None
    except OSError as err:
        raise CheckpointError(f"{source} cannot be read: {err.strerror or err}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeDecodeError, OverflowError, RuntimeError, zipfile.BadZipFile, struct.error) as err:
        raise CheckpointError(f"{source} cannot be read as a torch.save checkpoint (corrupt or truncated?): "
                              f"{type(err).__name__}: {err}") from None
    check_tree(root, unpickler)
    return root


def _name(obj) -> str:
    if isinstance(obj, Marker):
        return f"the global '{obj.qualname}'"
    if isinstance(obj, type) and issubclass(obj, Record):
        return f"the global '{obj.cls}'"
    if isinstance(obj, Record):
        return f"an object of '{obj.cls}'"
    return f"a {type(obj).__name__}"


def check_tree(root, unpickler) -> None:
    """Everything reachable must be a record, a tensor our rebuilders made (unchanged since), a plain
    container or a scalar."""
    scalars = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
    globals_by_id = {id(value): name for name, value in unpickler.resolved.items()}
    seen, todo = set(), [root]
    while todo:
        obj = todo.pop()
        if isinstance(obj, scalars):
            continue
        if isinstance(obj, torch.Tensor):
            made = unpickler.tensors.get(id(obj))
            if made is None or made[0] is not obj or (tuple(obj.shape), tuple(obj.stride()), obj.storage_offset()) \
                    != made[1:] or obj._backward_hooks:
                raise unpickler.refuse("a tensor was changed after torch's rebuilder made it (a BUILD step on it)")
            continue
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, Record):
            todo.append(obj.state)
        elif isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            todo.extend(obj)
        elif id(obj) in globals_by_id:
            raise unpickler.refuse(f"it holds the global '{globals_by_id[id(obj)]}' itself (a class or function) "
                                   "as a value")
        else:
            raise unpickler.refuse(f"it holds a bare {type(obj).__name__.lstrip('_').lower()}")


# ------------------------------------------------------------------------------------------ module trees
def modules_of(root: Record, source: str):
    """(dotted path, record) of every module under `root` ("" for the root), parents first and children in
    order, as nn.Module.state_dict walks them (a module shared by two parents is listed under both).
    Iterative, with the modules of the current path in a set: a module that contains itself is refused,
    and a deep chain costs no Python stack."""
    refuse = refusal(source)
    out, on_path = [], set()
    todo = [("", root)]
    while todo:
        path, record = todo.pop()
        if record is None:  # every module below `path` is done: it leaves the current path
            on_path.discard(path)
            continue
        out.append((path, record))
        on_path.add(id(record))
        todo.append((id(record), None))
        where = f"{root.cls}.{path}" if path else root.cls
        children = []
        for name, child in record.state["_modules"].items():
            if child is None:
                continue
            if not (isinstance(child, Record) and child.is_module) or not isinstance(name, str):
                raise refuse(f"the submodule {where}.{name} is {_name(child)}, not a module")
            if id(child) in on_path:
                raise refuse(f"the module {where}.{name} contains itself")
            children.append((f"{path}.{name}" if path else name, child))
        todo.extend(reversed(children))
    return out


def check_modules(root: Record, source: str) -> None:
    refuse = refusal(source)
    for path, record in modules_of(root, source):
        where = f"{root.cls}.{path}" if path else root.cls
        for table in HOOK_TABLES:
            if record.get(table):
                raise refuse(f"the module {where} ({record.cls}) has entries in {table}")
        for kind in ("_parameters", "_buffers"):
            for name, value in record.state[kind].items():
                if not (value is None or isinstance(value, torch.Tensor)) or not isinstance(name, str):
                    raise refuse(f"{where}.{name} in {kind} is {_name(value)}, not a tensor")


def state_dict_of(root: Record, source: str = "the checkpoint") -> OrderedDict:
    """nn.Module.state_dict of a module record: each module's parameters, persistent buffers, then its
    submodules', in order."""
    out = OrderedDict()
    for path, record in modules_of(root, source):
        prefix = f"{path}." if path else ""
        non_persistent = record.get("_non_persistent_buffers_set") or set()
        for name, tensor in record.state["_parameters"].items():
            if tensor is not None:
                out[prefix + name] = tensor.detach()
        for name, tensor in record.state["_buffers"].items():
            if tensor is not None and name not in non_persistent:
                out[prefix + name] = tensor.detach()
    return out
