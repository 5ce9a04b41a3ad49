"""Unpickling files from elsewhere without letting them run code or claim memory they do not hold.

A pickle can name any importable callable and have it called while loading, so `pickle.load` of a
downloaded file is as dangerous as running a script from it. `RestrictedUnpickler` resolves the globals
a file names through a table of what one kind of file may hold (the use's allow-list), built before
anything is read: every other global is refused before it is imported, and what an admitted name
resolves to is the use's own function or marker, never an arbitrary callable.

Two uses: the MulT data pickles (numpy arrays, src/data/safe_pickle.py) and the checkpoints that
torch.save wrote of whole models (src/run/torch_pickle.py). Only the public hooks of `pickle.Unpickler`
are used: `find_class` (what each global becomes) and `persistent_load` (torch's storages); instances are
created and given their state by Python's own opcodes, which call `__new__` and `__setstate__` of the
classes the table returns, so those classes decide what is accepted (see `Record`).

Memory: a file may declare sizes it does not back (an array of 10^10 elements from a few bytes, the same
payload referenced a thousand times). `Budget` lets a use charge every allocation a file declares to the
file's own size before it is made.
"""
from __future__ import annotations

import _compat_pickle
import pickle
from typing import Callable, Mapping

# What one use admits: "module.name" -> factory(unpickler, qualname) returning what the global becomes.
# A key "package.*" admits every identifier of that package and its submodules (the classes of a model's
# code, say), still through the factory.
Factory = Callable[["RestrictedUnpickler", str], object]


class Budget:
    """Bytes a file may make the reader allocate, in total, for one kind of allocation.

    Each byte of array data (or of decoded text) must come from a byte of the file; a file whose
    declarations add up to more is refused before the allocation that would exceed it."""

    def __init__(self, limit: int, what: str):
        self.limit, self.what, self.spent = limit, what, 0

    def spend(self, nbytes: int, unpickler: "RestrictedUnpickler", detail: str) -> None:
        self.spent += nbytes
        if self.spent > self.limit:
            raise unpickler.refuse(f"{detail}: its {self.what} add up to {self.spent} bytes, more than the "
                                   f"{self.limit} bytes of the file itself")


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler resolving only the globals in `admitted`.

    refuse(what) -> the exception to raise, with the source named; `storage(pid)` answers persistent ids
    (None: a file holding one is refused); `file_size` bounds the two budgets every use charges: `copies`
    (bytes that admitted calls make from what the file holds) and `allocations` (the array or storage
    sizes the file declares)."""

    def __init__(self, file, *, admitted: Mapping[str, Factory], refuse: Callable[[str], Exception],
                 file_size: int, encoding: str = "latin1", storage: Callable[[object], object] | None = None):
        # latin1 lets Python 2 era pickles decode their raw byte payloads unchanged.
        super().__init__(file, encoding=encoding)
        self.admitted = admitted
        self.refuse = refuse
        self.storage = storage
        # A payload is decoded from the file's text once and may be copied once (bytearray(encode(...))).
        self.copies = Budget(2 * file_size, "copied or decoded bytes")
        self.allocations = Budget(file_size, "declared data sizes")
        self.resolved: dict[str, object] = {}  # qualname -> what it became, once per file

    def find_class(self, module: str, name: str):
        # Protocols 0-2 may spell Python 2 names (__builtin__.set, copy_reg...): read them as pickle does.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        qualname = f"{module}.{name}"
        if qualname not in self.resolved:
            factory = self.admitted.get(qualname) or self._package_factory(module, name)
            if factory is None:
                raise self.refuse(f"it references the global '{qualname}', which is not admitted")
            self.resolved[qualname] = factory(self, qualname)
        return self.resolved[qualname]

    def _package_factory(self, module: str, name: str):
        if not name.isidentifier():
            return None
        parts = module.split(".")
        for depth in range(len(parts), 0, -1):
            factory = self.admitted.get(".".join(parts[:depth]) + ".*")
            if factory is not None:
                return factory
        return None

    def persistent_load(self, pid):
        if self.storage is None:
            raise self.refuse(f"it holds the persistent id {pid!r}, which this kind of file never does")
        return self.storage(pid)


class Record:
    """What a file pickled an object of an admitted class as: the class's name and the attribute dict,
    inert. `record_class(...)` makes one subclass per class name; pickle instantiates it with `__new__`
    (refused with arguments: an ordinary object is rebuilt without) and hands it its state through
    `__setstate__` (a dict of attributes, or torch's (dict, slots) pair), so no constructor, `__setstate__`
    or `__reduce__` of the file's choosing ever runs."""

    __slots__ = ("state",)
    cls = "?"
    _refuse: Callable[[str], Exception] = staticmethod(lambda what: ValueError(what))

    def __new__(cls, *args, **kwargs):
        if args or kwargs:
            raise cls._refuse(f"it calls the global '{cls.cls}' with arguments {args!r}")
        record = super().__new__(cls)
        record.state = {}
        return record

    def __setstate__(self, state):
        if isinstance(state, tuple) and len(state) == 2:  # (dict, slots)
            if not all(part is None or isinstance(part, dict) for part in state):
                raise self._refuse(f"the state of {self.cls} is a {type(state).__name__}")
            state = {**(state[0] or {}), **(state[1] or {})}
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise self._refuse(f"the state of {self.cls} is a {type(state).__name__}")
        self.state.update(state)

    def __repr__(self):
        return f"Record({self.cls})"

    def get(self, name: str, default=None):
        return self.state.get(name, default)

    @property
    def is_module(self) -> bool:
        """An nn.Module's attribute dict: parameters, buffers and submodules."""
        return all(isinstance(self.state.get(k), dict) for k in ("_parameters", "_buffers", "_modules"))


def record_class(unpickler: RestrictedUnpickler, qualname: str) -> type:
    """A factory for the allow-list: the global becomes a Record subclass named after it."""
    return type(qualname.rsplit(".", 1)[-1], (Record,), {"__slots__": (), "cls": qualname,
                                                          "_refuse": staticmethod(unpickler.refuse)})


class Marker:
    """A global a file may only pass to the use's own functions (a dtype's name, a type tag): calling it,
    or giving it state, is refused."""

    __slots__ = ("qualname", "value", "_refuse")

    def __init__(self, unpickler: RestrictedUnpickler, qualname: str, value=None):
        self.qualname, self.value, self._refuse = qualname, value, unpickler.refuse

    def __call__(self, *args, **kwargs):
        raise self._refuse(f"it calls the global '{self.qualname}'")

    def __setstate__(self, state):
        raise self._refuse(f"it sets the state of the global '{self.qualname}'")

    def __repr__(self):
        return f"<global {self.qualname}>"


def marker(value=None) -> Factory:
    return lambda unpickler, qualname: Marker(unpickler, qualname, value)


def function(make: Callable[[RestrictedUnpickler], Callable]) -> Factory:
    """A factory for the allow-list: the global becomes the use's own function, made per unpickler."""
    return lambda unpickler, qualname: make(unpickler)


def latin1_encode(unpickler: RestrictedUnpickler, qualname: str):
    """`_codecs.encode(text, "latin1")`: how protocols 0-2 write a bytes object. Only that encoding (one
    byte per character, so the result is no longer than the text the file holds), and the total charged
    to the file's size: a memoised text referenced many times cannot multiply itself."""
    def encode(text, encoding="latin1", errors="strict"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
            raise unpickler.refuse(f"_codecs.encode is called with ({type(text).__name__}, {encoding!r}); "
                                   "pickle only ever writes (text, 'latin1')")
        unpickler.copies.spend(len(text), unpickler, "it decodes bytes from text")
        return text.encode("latin1")
    return encode


def empty_bytes(unpickler: RestrictedUnpickler, qualname: str):
    """`bytes()` / `bytearray()` with no argument: how protocols 0-2 write an empty one. With an argument
    they would make any number of bytes from nothing (bytes(10**9)), so only a copy of bytes the file
    holds is also accepted (`bytearray(encode(...))`, protocol 2's bytearray), charged as a copy."""
    kind = bytearray if qualname.endswith("bytearray") else bytes

    def build(*args):
        if not args:
            return kind()
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
            unpickler.copies.spend(len(args[0]), unpickler, f"it copies bytes with {qualname}")
            return kind(args[0])
        raise unpickler.refuse(f"it calls {qualname} with {', '.join(type(a).__name__ for a in args)}; "
                               "only bytes() or a copy of bytes the file holds is admitted")
    return build
