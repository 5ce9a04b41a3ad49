"""Checkpoints of the published CausalMER code: read them without running them, import them, start from them.

The published code saves whole models with `torch.save(model)` (docs/design.md § Checkpoints of the published
code): pickles that name its classes (`src.models.MULTModel`, `src.causal_mer_model.CAUSALMER`, ...), torch
layers, transformers' ALBERT and torchvision's ResNet. Unpickling such a file normally imports those classes
and lets the file call whatever it names, so `torch.load` on a downloaded one is as dangerous as running a
script from it.

Here the pickle is read by an unpickler that imports nothing from the file. Every global the file names is
looked up in a fixed table and becomes a marker object:
- a class of the published code, of torch.nn, of ALBERT or of torchvision's ResNet -> a `Record` when the
  file instantiates it: its class name and its pickled attribute dict, inert (no constructor, no
  `__setstate__`, no `__reduce__` of the file's choosing runs);
- torch's tensor and storage rebuilders, `set`, `OrderedDict`, `torch.Size` -> our own functions, which
  accept only the arguments torch writes;
- torch dtypes -> the dtypes.
Any other global is refused before anything is called, with an error naming it, and the result must be a
tree of records, tensors, plain containers and scalars. The state_dict is then collected from the records'
`_parameters`, `_buffers` and `_modules` as `nn.Module.state_dict` would.

`import_published` builds the project's equivalent model (MulT, or CausalMER with `albert` and `resnet18`
branches) from the recovered hyperparameters and loads the mapped weights strictly;
`published_run_config` gives the run config that rebuilds it, which `main.py import-checkpoint` saves as a
run directory; `init_from_published` sets a new run's weights from such a file (`train --init-from`).
"""
from __future__ import annotations

import _compat_pickle
import hashlib
import inspect
import io
import logging
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import CheckpointError

log = logging.getLogger("causalmer")

PUBLISHED_MULT = "src.models.MULTModel"
PUBLISHED_CAUSALMER = "src.causal_mer_model.CAUSALMER"

# Modules whose classes may appear in a published checkpoint; an instance of any of them becomes a Record.
# Nothing is ever imported from them.
RECORD_MODULES = ("src", "modules", "torch.nn.modules", "transformers.models.albert", "transformers.activations",
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
    """A published checkpoint holds something other than a module tree of tensors and plain data."""


# ------------------------------------------------------------------------------------------ the unpickler
class Record:
    """What the file pickled an object of class `cls` as: its attribute dict, and nothing that runs."""

    __slots__ = ("cls", "state")

    def __init__(self, cls: str):
        self.cls = cls
        self.state = {}

    def __repr__(self):
        return f"Record({self.cls})"

    @property
    def is_module(self) -> bool:
        return all(isinstance(self.state.get(k), dict) for k in ("_parameters", "_buffers", "_modules"))

    def get(self, name: str, default=None):
        return self.state.get(name, default)


class _Global:
    """A global the file names. `kind` says what the file may do with it: instantiate it ("record"), call
    it ("function": `impl` is ours), or pass it to one of our functions ("marker")."""

    __slots__ = ("qualname", "kind", "impl", "value")

    def __init__(self, qualname: str, kind: str, impl=None, value=None):
        self.qualname, self.kind, self.impl, self.value = qualname, kind, impl, value

    def __repr__(self):
        return f"<global {self.qualname}>"


class _Storage:
    """A storage's bytes, typed; tensors are views into `flat`."""

    __slots__ = ("flat",)

    def __init__(self, flat: torch.Tensor):
        self.flat = flat


def _refuse(source: str, what: str) -> RefusedCheckpoint:
    return RefusedCheckpoint(
        f"refusing to read {source}: {what}. A checkpoint of the published code holds only its model classes, "
        "torch layers, tensors and plain data; this file may be corrupt or malicious (do not open it with "
        "torch.load(weights_only=False)). Nothing from it was run.")


def _tensor_from_storage(source, storage, offset, size, stride) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise _refuse(source, f"a tensor is rebuilt from {type(storage).__name__}, not from a storage")
    if not (isinstance(offset, int) and all(isinstance(s, int) and s >= 0 for s in (*size, *stride))
            and len(size) == len(stride) and offset >= 0):
        raise _refuse(source, f"a tensor has a malformed layout (offset {offset!r}, size {size!r}, stride {stride!r})")
    numel = storage.flat.numel()
    extent = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0
    if extent > numel:
        raise _refuse(source, f"a tensor of size {tuple(size)} reaches element {extent} of a storage of {numel}")
    return storage.flat.as_strided(tuple(size), tuple(stride), offset)


def _plain_state(source: str, state, what: str) -> None:
    if state is None:
        return
    if not isinstance(state, dict) or any(not isinstance(v, (bool, int, float, str, type(None))) for v in state.values()):
        raise _refuse(source, f"{what} carries state other than plain flags: {state!r}")


def _no_hooks(source: str, hooks) -> None:
    if hooks not in (None, {}) and not (isinstance(hooks, OrderedDict) and not hooks):
        raise _refuse(source, "a tensor carries backward hooks")


class _Unpickler(pickle._Unpickler):
    """Python's own unpickler with every opcode that could call, import or set state replaced by ours."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, source: str, storage_loader=None):
        super().__init__(file, encoding="utf-8")
        self.source = source
        self.storage_loader = storage_loader
        self.functions = self._functions()

    # -- globals
    def _functions(self) -> dict:
        src = self.source

        def rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
            _no_hooks(src, hooks)
            _plain_state(src, metadata, "a tensor")
            return _tensor_from_storage(src, storage, offset, size, stride)

        def rebuild_tensor(storage, offset, size, stride):
            return _tensor_from_storage(src, storage, offset, size, stride)

        def rebuild_parameter(data, requires_grad, hooks, state=None):
            if not isinstance(data, torch.Tensor) or not isinstance(requires_grad, bool):
                raise _refuse(src, "a parameter is rebuilt from something other than a tensor")
            _no_hooks(src, hooks)
            _plain_state(src, state, "a parameter")
            return torch.nn.Parameter(data, requires_grad=requires_grad)

        def rebuild_from_type_v2(func, new_type, args, state):
            if not (isinstance(func, _Global) and func.qualname == "torch._utils._rebuild_tensor_v2"):
                raise _refuse(src, f"_rebuild_from_type_v2 is asked to call {func!r}")
            if not (isinstance(new_type, _Global) and new_type.qualname in ("torch.Tensor", "torch.nn.parameter.Parameter")):
                raise _refuse(src, f"_rebuild_from_type_v2 is asked to make a {new_type!r}")
            _plain_state(src, state, "a tensor")  # e.g. transformers' `persistent` flag on buffers
            tensor = func.impl(*args)
            return torch.nn.Parameter(tensor, requires_grad=False) if new_type.value == "parameter" else tensor

        def container(kind):
            def build(items=()):
                if not isinstance(items, (list, tuple)):
                    raise _refuse(src, f"a {kind.__name__} is built from {type(items).__name__}")
                return kind(items)
            return build

        def size(dims=()):
            if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
                raise _refuse(src, f"torch.Size is built from {dims!r}")
            return torch.Size(dims)

        def device(*spec):
            if not 1 <= len(spec) <= 2 or not all(isinstance(s, (str, int)) for s in spec):
                raise _refuse(src, f"torch.device is built from {spec!r}")
            return torch.device(*spec)

        def encode(text, encoding="latin1"):
            # Protocol 2 writes bytes as encode(text, "latin1").
            if not isinstance(text, str) or encoding != "latin1":
                raise _refuse(src, f"_codecs.encode is called with {encoding!r}")
            return text.encode("latin1")

        return {
            "torch._utils._rebuild_tensor_v2": rebuild_tensor_v2,
            "torch._utils._rebuild_tensor": rebuild_tensor,
            "torch._utils._rebuild_parameter": rebuild_parameter,
            "torch._utils._rebuild_parameter_with_state": rebuild_parameter,
            "torch._tensor._rebuild_from_type_v2": rebuild_from_type_v2,
            "builtins.set": container(set), "builtins.frozenset": container(frozenset),
            "collections.OrderedDict": container(OrderedDict),
            "torch.Size": size, "torch.device": device, "_codecs.encode": encode,
        }

    def find_class(self, module: str, name: str):
        # Protocol 2 writes Python 2 spellings (__builtin__.set, commands.call): read them as Python does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualname = f"{module}.{name}"
        if qualname in self.functions:
            return _Global(qualname, "function", impl=self.functions[qualname])
        if module == "torch" and name in STORAGE_DTYPES:
            return _Global(qualname, "marker", value=STORAGE_DTYPES[name])
        if qualname == "torch.Tensor":
            return _Global(qualname, "marker", value="tensor")
        if qualname == "torch.nn.parameter.Parameter":
            return _Global(qualname, "marker", value="parameter")
        if module == "torch" and name in DTYPE_NAMES:
            return getattr(torch, name)
        if any(module == m or module.startswith(m + ".") for m in RECORD_MODULES) and name.isidentifier():
            return _Global(qualname, "record")
        raise _refuse(self.source, f"it references the global '{qualname}', which is not admitted")

    # -- storages
    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid):
            raise _refuse(self.source, f"it holds the persistent id {pid!r}")
        if pid[0] == "module" and len(pid) == 4 and isinstance(pid[1], _Global) and pid[1].kind == "record":
            return pid[1]  # the legacy format names each module class with its source; the source is ignored
        if pid[0] != "storage" or len(pid) not in (5, 6):
            raise _refuse(self.source, f"it holds the persistent id {pid[0]!r}")
        storage_type, key, _location, numel = pid[1:5]
        if len(pid) == 6 and pid[5] is not None:
            raise _refuse(self.source, "it holds a storage view (a torch before 1.0 wrote those): not supported")
        if not (isinstance(storage_type, _Global) and isinstance(storage_type.value, torch.dtype)):
            raise _refuse(self.source, f"a storage has the type {storage_type!r}")
        if not isinstance(key, str) or not isinstance(numel, int) or numel < 0:
            raise _refuse(self.source, f"a storage has the key {key!r} and size {numel!r}")
        return self.storage_loader(key, storage_type.value, numel)

    # -- opcodes that would call or set state
    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if not (isinstance(func, _Global) and func.kind == "function"):
            raise _refuse(self.source, f"it calls {_name(func)}")
        if not isinstance(args, tuple):
            raise _refuse(self.source, f"it calls {func.qualname} with {type(args).__name__} arguments")
        self.stack[-1] = func.impl(*args)
    dispatch[pickle.REDUCE[0]] = load_reduce

    def _new_record(self, cls, args, kwargs=None):
        if not (isinstance(cls, _Global) and cls.kind == "record"):
            raise _refuse(self.source, f"it instantiates {_name(cls)}")
        if args != () or kwargs:
            raise _refuse(self.source, f"it instantiates {cls.qualname} with constructor arguments {args!r}")
        return Record(cls.qualname)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new_record(cls, args))
    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new_record(cls, args, kwargs))
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if not isinstance(inst, Record):
            raise _refuse(self.source, f"it sets the state of {_name(inst)}")
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise _refuse(self.source, f"the state of {inst.cls} is a {type(state).__name__}")
        inst.state.update(state)
    dispatch[pickle.BUILD[0]] = load_build

    def _unsupported(self):
        raise _refuse(self.source, "it uses a pickle opcode (INST, OBJ or EXT) that torch.save never writes")
    for _op in (pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = _unsupported
    del _op


def _name(obj) -> str:
    if isinstance(obj, _Global):
        return f"the global '{obj.qualname}'"
    if isinstance(obj, Record):
        return f"an object of '{obj.cls}'"
    return f"a {type(obj).__name__}"


def _check_tree(root, source: str) -> None:
    """Everything reachable must be a record, a tensor, a plain container or a scalar."""
    scalars = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
    seen, todo = set(), [root]
    while todo:
        obj = todo.pop()
        if isinstance(obj, scalars) or isinstance(obj, torch.Tensor):
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
        elif isinstance(obj, _Global):
            raise _refuse(source, f"it holds the global '{obj.qualname}' itself (a class or function) as a value")
        else:
            raise _refuse(source, f"it holds a bare {type(obj).__name__.lstrip('_').lower()}")


# ------------------------------------------------------------------------------------------ file formats
def _load_zip(path: Path, source: str):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise CheckpointError(f"{source} is a zip file but not one torch.save wrote (no single <name>/data.pkl)")
        prefix = pickles[0][: -len("data.pkl")]
        order = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        storages = {}

        def load_storage(key, dtype, numel):
            if key not in storages:
                record = f"{prefix}data/{key}"
                if record not in names:
                    raise CheckpointError(f"{source} is truncated or corrupt: its storage {key} is missing")
                storages[key] = _Storage(_typed(archive.read(record), dtype, numel, order, source))
            return storages[key]

        unpickler = _Unpickler(io.BytesIO(archive.read(pickles[0])), source, load_storage)
        return unpickler.load()


def _typed(data: bytes, dtype: torch.dtype, numel: int, order: str, source: str) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
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


def _load_legacy(path: Path, source: str):
    """torch.save(..., _use_new_zipfile_serialization=False): magic number, protocol, system info, the
    object pickle, the list of storage keys, then each storage as an int64 element count and its bytes.

    The bytes come after the object pickle, so it is read twice: once to learn the storages (tensors
    then view shape-only `meta` placeholders), and once more with the bytes.
    """
    with open(path, "rb") as f:
        def plain():
            return _Unpickler(f, source).load()

        try:
            magic = plain()
        except RefusedCheckpoint:
            raise
        except Exception:
            raise CheckpointError(f"{source} is neither a zip nor a legacy file written by torch.save") from None
        if magic != LEGACY_MAGIC:
            raise CheckpointError(f"{source} is neither a zip nor a legacy file written by torch.save "
                                  "(a torch older than 1.0 wrote tar files: not supported)")
        plain()  # protocol version
        info = plain()
        if isinstance(info, dict) and info.get("little_endian") is False:
            raise CheckpointError(f"{source} was written on a big-endian machine: not supported")
        start = f.tell()
        wanted = {}

        def placeholder(key, dtype, numel):
            if key not in wanted:
                wanted[key] = (dtype, numel, _Storage(torch.empty(numel, dtype=dtype, device="meta")))
            return wanted[key][2]

        _Unpickler(f, source, placeholder).load()
        keys = plain()
        if not isinstance(keys, list) or set(keys) != set(wanted):
            raise CheckpointError(f"{source} is corrupt: its storage list does not match its tensors")
        storages = {}
        for key in keys:
            dtype, numel, _ = wanted[key]
            header = f.read(8)
            if len(header) < 8 or struct.unpack("<q", header)[0] != numel:
                raise CheckpointError(f"{source} is truncated or corrupt at storage {key}")
            size = torch.empty((), dtype=dtype).element_size()
            storages[key] = _Storage(_typed(f.read(numel * size), dtype, numel, "little", source))
        f.seek(start)
        return _Unpickler(f, source, lambda key, dtype, numel: storages[key]).load()


def read_published(path) -> Record:
    """The record tree of a published whole-model checkpoint (zip or legacy format), validated."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise CheckpointError(f"published checkpoint {path} not found")
    try:
        if zipfile.is_zipfile(path):
            root = _load_zip(path, source)
        else:
            root = _load_legacy(path, source)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            UnicodeDecodeError, OverflowError, RuntimeError, zipfile.BadZipFile, struct.error) as err:
        raise CheckpointError(f"{source} cannot be read as a torch.save checkpoint (corrupt or truncated?): "
                              f"{type(err).__name__}: {err}") from None
    _check_tree(root, source)
    if not (isinstance(root, Record) and root.is_module):
        raise RefusedCheckpoint(f"{source} does not hold a pickled model (found {_name(root)}); a published "
                                "checkpoint is torch.save(model) of its MULTModel or CAUSALMER")
    _check_modules(root, source, root.cls)
    return root


def _check_modules(record: Record, source: str, where: str) -> None:
    for table in HOOK_TABLES:
        if record.get(table):
            raise _refuse(source, f"the module {where} ({record.cls}) has entries in {table}")
    for kind in ("_parameters", "_buffers"):
        for name, value in record.state[kind].items():
            if not (value is None or isinstance(value, torch.Tensor)) or not isinstance(name, str):
                raise _refuse(source, f"{where}.{name} in {kind} is {_name(value)}, not a tensor")
    for name, child in record.state["_modules"].items():
        if child is None:
            continue
        if not (isinstance(child, Record) and child.is_module) or not isinstance(name, str):
            raise _refuse(source, f"the submodule {where}.{name} is {_name(child)}, not a module")
        _check_modules(child, source, f"{where}.{name}")


def state_dict_of(record: Record, prefix: str = "", out: dict | None = None) -> OrderedDict:
    """nn.Module.state_dict of a module record: parameters, persistent buffers, then submodules."""
    out = OrderedDict() if out is None else out
    non_persistent = record.get("_non_persistent_buffers_set") or set()
    for name, tensor in record.state["_parameters"].items():
        if tensor is not None:
            out[prefix + name] = tensor.detach()
    for name, tensor in record.state["_buffers"].items():
        if tensor is not None and name not in non_persistent:
            out[prefix + name] = tensor.detach()
    for name, child in record.state["_modules"].items():
        if child is not None:
            state_dict_of(child, f"{prefix}{name}.", out)
    return out


def read_published_state_dict(path) -> OrderedDict:
    """The state_dict the pickled model would give, read without executing anything from the file."""
    return state_dict_of(read_published(path))


# ------------------------------------------------------------------------------------------ import
# Buffers of the published modules that hold no weights: MulT's encoder version and position-table
# placeholders, and ALBERT's index tables (persistent in older transformers releases).
WEIGHTLESS_SUFFIXES = (".version", ".embed_positions._float_tensor", "embeddings.position_ids",
                       "embeddings.token_type_ids")
# The AlbertConfig attributes that define the network (not the generic output and bookkeeping options).
ALBERT_FIELDS = ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_hidden_groups",
                 "num_attention_heads", "intermediate_size", "inner_group_num", "hidden_act", "hidden_dropout_prob",
                 "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size", "initializer_range",
                 "layer_norm_eps", "classifier_dropout_prob", "position_embedding_type", "pad_token_id",
                 "bos_token_id", "eos_token_id")
MULT_DROPOUTS = ("attn_dropout", "attn_dropout_a", "attn_dropout_v", "relu_dropout", "res_dropout",
                 "embed_dropout", "out_dropout")


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _attr(record: Record, name: str, types, source: str, where: str):
    value = record.get(name)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
        raise CheckpointError(f"{source}: the published {where} ({record.cls}) has no usable attribute "
                              f"'{name}' (found {value!r})")
    return value


def _child(record: Record, name: str, source: str, where: str) -> Record:
    child = record.state["_modules"].get(name)
    if child is None:
        raise CheckpointError(f"{source}: the published {where} ({record.cls}) has no submodule '{name}'")
    return child


def _mult_params(mult: Record, source: str) -> tuple[dict, tuple, int]:
    """The project's MulT keywords, the feature sizes and the output width of a published MULTModel record.

    Every value comes from the record's attributes; its encoders' own attributes are checked against
    them, so a file the project's MulT cannot reproduce is refused instead of imported wrongly.
    """
    where = "MULTModel"
    for flag in ("lonly", "aonly", "vonly"):
        if mult.get(flag, True) is not True:
            raise CheckpointError(f"{source}: the published MULTModel was built with {flag}=False (a partial MulT); "
                                  "the project's MulT has all three crossmodal targets")
    dims = tuple(_attr(mult, f"orig_d_{m}", int, source, where) for m in "lav")
    widths = {_attr(mult, f"d_{m}", int, source, where) for m in "lav"}
    if len(widths) != 1:
        raise CheckpointError(f"{source}: the published MULTModel has per-modality widths d_l, d_a, d_v = "
                              f"{sorted(widths)}; the project's MulT has one d_model")
    d_model = widths.pop()
    layers = _attr(mult, "layers", int, source, where)
    params = {"d_model": d_model, "layers": layers}
    for name in MULT_DROPOUTS:
        params[name] = float(_attr(mult, name, (int, float), source, where))
    params["attn_mask"] = _attr(mult, "attn_mask", bool, source, where)

    kernels = []
    for m in "lav":
        conv = _child(mult, f"proj_{m}", source, where)
        kernel = _attr(conv, "kernel_size", tuple, source, f"proj_{m}")
        weight = conv.state["_parameters"].get("weight")
        if (len(kernel) != 1 or conv.get("padding") not in ((0,), 0) or conv.state["_parameters"].get("bias") is not None
                or weight is None or tuple(weight.shape) != (d_model, dims["lav".index(m)], kernel[0])):
            raise CheckpointError(f"{source}: the published proj_{m} is not a Conv1d({dims['lav'.index(m)]} -> "
                                  f"{d_model}, kernel k, padding 0, no bias) as MulT's projections are")
        kernels.append(kernel[0])
    params["kernel_sizes"] = kernels

    # Encoders: depth, attention dropout (by source modality), heads and the other dropouts, as
    # docs/design.md § MulT describes them.
    by_source = {"l": params["attn_dropout"], "a": params["attn_dropout_a"], "v": params["attn_dropout_v"]}
    from ..models.mult import CROSSMODAL_NAMES, MEMORY_NAMES, REFERENCE_NUM_HEADS

    heads = set()
    for name in CROSSMODAL_NAMES + MEMORY_NAMES:
        encoder = _child(mult, name, source, where)
        memory = name in MEMORY_NAMES
        expected = {"attn_dropout": params["attn_dropout"] if memory else by_source[name[-1]],
                    "dropout": params["embed_dropout"], "attn_mask": params["attn_mask"]}
        blocks = _child(encoder, "layers", source, name).state["_modules"]
        depth = max(layers, 3) if memory else layers
        if len(blocks) != depth:
            raise CheckpointError(f"{source}: the published {name} has {len(blocks)} layers where its MULTModel's "
                                  f"layers={layers} gives {depth}")
        checks = [(name, encoder, expected)]
        for index, block in blocks.items():
            checks.append((f"{name}.layers.{index}", block, {"relu_dropout": params["relu_dropout"],
                                                             "res_dropout": params["res_dropout"]}))
            attention = _child(block, "self_attn", source, f"{name}.layers.{index}")
            heads.add(attention.get("num_heads"))
            checks.append((f"{name}.layers.{index}.self_attn", attention, {"attn_dropout": expected["attn_dropout"]}))
        for path, record, wanted in checks:
            for key, value in wanted.items():
                if key in record.state and record.state[key] != value:
                    raise CheckpointError(f"{source}: the published {path} has {key}={record.state[key]!r} where its "
                                          f"MULTModel's attributes give {value!r}; the project's MulT cannot hold it")
    if len(heads) != 1 or not isinstance(next(iter(heads)), int):
        raise CheckpointError(f"{source}: the published MULTModel's attentions have head counts {sorted(map(str, heads))}")
    params["num_heads"] = heads.pop()
    params["use_configured_heads"] = params["num_heads"] != REFERENCE_NUM_HEADS
    out_weight = _child(mult, "out_layer", source, where).state["_parameters"].get("weight")
    if out_weight is None or out_weight.dim() != 2:
        raise CheckpointError(f"{source}: the published MULTModel's out_layer has no (C, 6·d) weight")
    return params, dims, int(out_weight.shape[0])


def _albert_config(text: Record, source: str) -> dict:
    """The architecture fields of the pickled AlbertConfig record, as AlbertBranch's `config`."""
    from ..models.albert import _import_transformers

    albert = _child(text, "model", source, "text branch")
    config = albert.get("config")
    if not (isinstance(config, Record) and config.cls.endswith(".AlbertConfig")):
        raise CheckpointError(f"{source}: the published text branch's ALBERT has no pickled AlbertConfig "
                              f"(found {_name(config)})")
    accepted = inspect.signature(_import_transformers().AlbertConfig.__init__).parameters
    plain = (bool, int, float, str, type(None))
    return {k: v for k, v in config.state.items() if k in ALBERT_FIELDS and k in accepted and isinstance(v, plain)}


def _resnet_width(branch: Record, source: str, where: str) -> int:
    """The width of a published torchvision ResNet-18 branch (conv1's output channels)."""
    conv1 = _child(branch, "conv1", source, where)
    weight = conv1.state["_parameters"].get("weight")
    if (weight is None or weight.dim() != 4 or tuple(weight.shape[1:]) != (1, 7, 7)
            or conv1.get("stride") != (2, 2) or conv1.get("padding") != (3, 3)):
        raise CheckpointError(f"{source}: the published {where}.conv1 is not Conv2d(1, width, 7, stride 2, padding 3)")
    for stage in range(1, 5):
        blocks = _child(branch, f"layer{stage}", source, where).state["_modules"]
        if sorted(blocks) != ["0", "1"]:
            raise CheckpointError(f"{source}: the published {where}.layer{stage} has blocks {sorted(blocks)}; "
                                  "a ResNet-18 has two per stage")
    return int(weight.shape[0])


def _resnet_name(name: str) -> str:
    """torchvision ResNet names -> ResNet18Branch's (stem, stages, shortcut)."""
    match = re.match(r"layer([1-4])\.([01])\.(.*)", name)
    if match:
        stage, block, rest = match.groups()
        return f"stages.{2 * (int(stage) - 1) + int(block)}.{rest.replace('downsample.', 'shortcut.', 1)}"
    for old, new in (("conv1.", "stem.0."), ("bn1.", "stem.1.")):
        if name.startswith(old):
            return new + name[len(old):]
    return name


# Published CAUSALMER prefixes -> the project's CausalMER's.
CAUSALMER_PREFIXES = (("tav_branch.", "backbone."), ("t_branch.linear_transformation.", "text_branch.embed."),
                      ("t_branch.model.", "text_branch.albert."), ("t_branch.text_mlp.", "text_branch.out."))
RESNET_PREFIXES = (("a_branch.a_branch.", "audio_branch."), ("v_branch.v_branch.", "vision_branch."))


def _map_causalmer(state: dict, source: str) -> OrderedDict:
    mapped = OrderedDict()
    for key, tensor in state.items():
        new = None
        for old, prefix in CAUSALMER_PREFIXES:
            if key.startswith(old):
                new = prefix + key[len(old):]
        for old, prefix in RESNET_PREFIXES:
            if key.startswith(old):
                new = prefix + _resnet_name(key[len(old):])
        if key in ("constant_t", "constant_a", "constant_v"):
            new = f"head.{key}"
        if new is None:
            raise CheckpointError(f"{source}: the published CAUSALMER holds '{key}', which the project's CausalMER "
                                  "has no place for")
        mapped[new] = tensor
    return mapped


def _task_for(dataset: str, output_dim: int, source: str) -> str:
    from ..data.layout import OUTPUT_DIMS, get_spec

    tasks = [t for t in get_spec(dataset).tasks if OUTPUT_DIMS[t] == output_dim]
    if not tasks:
        valid = ", ".join(f"{OUTPUT_DIMS[t]} ({t})" for t in get_spec(dataset).tasks)
        raise CheckpointError(f"{source}: the published model has {output_dim} outputs; {dataset} models have {valid}")
    return tasks[0]


def plan_import(root: Record, dataset: str, source: str) -> dict:
    """What the project needs to rebuild a published model: the config's model section, task, feature
    sizes, output width, and the state_dict under the project's names (for CausalMER or BackboneOnly)."""
    from ..data.layout import get_spec

    if root.cls == PUBLISHED_MULT:
        kind, mult = "mult", root
    elif root.cls == PUBLISHED_CAUSALMER:
        kind, mult = "causalmer", _child(root, "tav_branch", source, "CAUSALMER")
        if mult.cls != PUBLISHED_MULT:
            raise CheckpointError(f"{source}: the CAUSALMER's tav_branch is a {mult.cls}, not a {PUBLISHED_MULT}")
    else:
        raise CheckpointError(f"{source} holds a {root.cls}; a published checkpoint holds a {PUBLISHED_MULT} "
                              f"or a {PUBLISHED_CAUSALMER}")
    trained_on = mult.get("dataset")
    if isinstance(trained_on, str) and trained_on != dataset:
        raise CheckpointError(f"{source} holds a model for {trained_on}, not {dataset}: pass --dataset {trained_on}")
    params, dims, output_dim = _mult_params(mult, source)
    if dims != get_spec(dataset).dims:
        raise CheckpointError(f"{source}: the published MulT reads features of sizes {dims}; {dataset}'s are "
                              f"{get_spec(dataset).dims}")
    state = state_dict_of(root)
    section = {"backbone": "mult", "backbone_params": params}
    if kind == "mult":
        section["name"] = "backbone"
        mapped = OrderedDict((f"backbone.{k}", v) for k, v in state.items())
    else:
        section["name"] = "causalmer"
        text = _child(root, "t_branch", source, "CAUSALMER")
        for name in ("linear_transformation", "model", "text_mlp"):
            _child(text, name, source, "text branch (src.model_t.AlbertTextModel)")
        audio = _child(_child(root, "a_branch", source, "CAUSALMER"), "a_branch", source, "a_branch")
        vision = _child(_child(root, "v_branch", source, "CAUSALMER"), "v_branch", source, "v_branch")
        section["branches"] = {"text": {"kind": "albert", "config": _albert_config(text, source)},
                               "audio": {"kind": "resnet18", "width": _resnet_width(audio, source, "a_branch.a_branch")},
                               "vision": {"kind": "resnet18", "width": _resnet_width(vision, source, "v_branch.v_branch")}}
        from ..causal import FUSIONS

        fusion = root.get("fusion_mode")
        if fusion not in FUSIONS:
            raise CheckpointError(f"{source}: the published CAUSALMER's fusion_mode is {fusion!r}; known fusions: "
                                  f"{', '.join(FUSIONS)}")
        section["head"] = {"fusion": fusion, "constant": 0.0}
        for key in ("constant_t", "constant_a", "constant_v"):
            constant = root.state["_parameters"].get(key)
            if constant is None or constant.numel() != 1:
                raise CheckpointError(f"{source}: the published CAUSALMER's {key} is not a scalar parameter")
            state[key] = constant.reshape(())
        mapped = _map_causalmer(state, source)
    return {"kind": kind, "model": section, "task": _task_for(dataset, output_dim, source), "dims": dims,
            "output_dim": output_dim, "state_dict": mapped}


def load_strict(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load every parameter and buffer of `model` from `state`; anything left over is an error, except
    the published modules' weightless buffers (WEIGHTLESS_SUFFIXES)."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected and not k.endswith(WEIGHTLESS_SUFFIXES)]
    if missing or extra:
        raise CheckpointError(f"{source} does not fit the model: "
                              + "; ".join(part for part in (
                                  f"missing {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}" if missing else "",
                                  f"unexpected {', '.join(extra[:4])}{' ...' if len(extra) > 4 else ''}" if extra else "")
                                  if part))
    for key, tensor in expected.items():
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise CheckpointError(f"{source} does not fit the model: {key} is {tuple(state[key].shape)} there, "
                                  f"{tuple(tensor.shape)} here")
    model.load_state_dict({k: state[k] for k in expected}, strict=True)


def build_imported(plan: dict, loss: dict | None = None) -> torch.nn.Module:
    """The project's model for an import plan (CausalMER or BackboneOnly), holding the file's weights."""
    from .build import build_model

    cfg = {"model": plan["model"], "loss": loss or {"alpha": 0.1, "beta": 1.0, "kl": "all"}}
    model = build_model(cfg, plan["dims"], (None, None, None), plan["output_dim"])
    load_strict(model, plan["state_dict"], "the published checkpoint")
    return model.eval()


def import_published(path, dataset: str) -> torch.nn.Module:
    """The project's model holding a published checkpoint's weights, in eval mode: MulT alone for a
    MULTModel (forward -> (logits, last_hs)), CausalMER for a CAUSALMER (forward -> dict with logits_tie,
    the published logits_causal_mer, and logits_te)."""
    plan = plan_import(read_published(path), dataset, str(path))
    model = build_imported(plan)
    return model.backbone if plan["kind"] == "mult" else model


def published_run_config(path, dataset: str, aligned: bool = True, data_dir: str | None = None):
    """(run config, import plan) for a published checkpoint: the dataset's config with the file's model."""
    from .config import load_config, validate

    plan = plan_import(read_published(path), dataset, str(path))
    cli = {"data.task": plan["task"], "data.aligned": aligned, "data.dir": data_dir}
    cfg = load_config(dataset, backbone="mult", model_name=plan["model"]["name"], cli=cli)
    cfg["model"].update(plan["model"])
    cfg["model"]["init_from"] = {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}
    return validate(cfg), plan


# ------------------------------------------------------------------------------------------ --init-from
def init_record(path) -> dict:
    """The config entry `model.init_from` for a published file, after checking that it reads as one."""
    root = read_published(path)
    if root.cls not in (PUBLISHED_MULT, PUBLISHED_CAUSALMER):
        raise CheckpointError(f"--init-from {path} holds a {root.cls}, not a {PUBLISHED_MULT} or {PUBLISHED_CAUSALMER}")
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def init_from_published(model: torch.nn.Module, init: dict, dataset: str) -> None:
    """Set a new run's weights from a published file: its MulT becomes the backbone; a CAUSALMER's branches
    and constants are used where the run has branches of the same kinds, and the others keep their init."""
    from ..models.mult import MulT

    path = Path(init["path"])
    if not path.is_file():
        raise CheckpointError(f"model.init_from: {path} not found")
    if file_sha256(path) != init["sha256"]:
        raise CheckpointError(f"model.init_from: {path} has changed since the run was configured (sha256 differs)")
    plan = plan_import(read_published(path), dataset, str(path))
    if not isinstance(model.backbone, MulT):
        raise CheckpointError(f"--init-from {path}: the file holds a MulT backbone, but this run's backbone is a "
                              f"{type(model.backbone).__name__}; train with --backbone mult (or --model mult)")
    state = plan["state_dict"]

    def part(prefix):
        return OrderedDict((k[len(prefix):], v) for k, v in state.items() if k.startswith(prefix))

    load_strict(model.backbone, part("backbone."), f"--init-from {path} (its MulT)")
    loaded = ["backbone"]
    if plan["kind"] == "causalmer" and model.constants():  # a CausalMER run, not a backbone alone
        from ..models.albert import AlbertBranch
        from ..models.branches import ResNet18Branch

        for name, kind in (("text_branch", AlbertBranch), ("audio_branch", ResNet18Branch), ("vision_branch", ResNet18Branch)):
            branch = getattr(model, name)
            if isinstance(branch, kind):
                load_strict(branch, part(f"{name}."), f"--init-from {path} (its {name})")
                loaded.append(name)
            else:
                log.info("%s keeps its own initialisation: the file's is %s, this run's is %s", name,
                         kind.__name__, type(branch).__name__)
        with torch.no_grad():
            for letter, constant in model.constants().items():
                constant.copy_(state[f"head.constant_{letter}"])
        loaded.append("constants")
    log.info("initialised %s from %s", ", ".join(loaded), path)
