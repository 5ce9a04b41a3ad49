"""YAML as this tool reads and writes it (configs, the config inside a checkpoint, `--set` values).

PyYAML implements YAML 1.1; configs are read as YAML 1.2's core schema instead: `1e-3` is a float, `010`
is 10 (`0o10` is 8, `0x10` is 16), and 1.1's `yes`/`no`/`on`/`off`, sexagesimal `1:00` and dates are plain
strings. A key given twice in one mapping, an alias inside the value it names, and aliases that expand to
more than MAX_YAML_NODES values are refused (YAMLRefused) before anything is built from them: a
"billion laughs" document of a few KB costs its own size. What the tool writes quotes every string that
YAML 1.1 or 1.2 would read as something else, so it reads back the same under either.
"""
from __future__ import annotations

import math
import re

import yaml

MAX_YAML_NODES = 100_000  # values a config may expand to through aliases (ours have a few hundred)


class YAMLRefused(yaml.YAMLError):
    """YAML that parses but that a config may not be: a key given twice, aliases expanding too far."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2's core schema (PyYAML implements 1.1), with a key given twice refused."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # an unhashable key: SafeLoader refuses it
            if duplicate:
                raise YAMLRefused(f"the key {key!r} is given twice (line {key_node.start_mark.line + 1}); "
                                  "keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


class _Dumper(yaml.SafeDumper):
    """Quotes every string that YAML 1.1 or 1.2 would read as something else, so configs written by
    this tool read back the same under either."""


_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)"
                    r"|\.(?:nan|NaN|NAN))$")
_CORE = (("tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]),
         ("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")),
         ("tag:yaml.org,2002:int", _INT, list("-+0123456789")),
         ("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789.")))
_Loader.yaml_implicit_resolvers = {}  # none of 1.1's: no octal 010, sexagesimal 1:00, yes/no/on/off, dates
for _tag, _regexp, _first in _CORE:
    _Loader.add_implicit_resolver(_tag, _regexp, _first)
    _Dumper.add_implicit_resolver(_tag, _regexp, _first)


def _scalar(loader, node, pattern, convert, what):
    text = loader.construct_scalar(node)
    if pattern.match(text):
        try:
            return convert(text)
        except ValueError:  # e.g. an integer of more digits than Python converts
            pass
    raise YAMLRefused(f"{text[:40]!r} (line {node.start_mark.line + 1}) is not {what} in YAML 1.2")


def _to_int(text: str) -> int:
    base = {"0o": 8, "0x": 16}.get(text[:2], 10)
    return int(text[2:] if base != 10 else text, base)


def _to_float(text: str) -> float:
    special = {".inf": math.inf, "+.inf": math.inf, "-.inf": -math.inf, ".nan": math.nan}
    return special[text.lower()] if text.lower() in special else float(text)


_Loader.add_constructor("tag:yaml.org,2002:int", lambda l, n: _scalar(l, n, _INT, _to_int, "an integer"))
_Loader.add_constructor("tag:yaml.org,2002:float", lambda l, n: _scalar(l, n, _FLOAT, _to_float, "a number"))
_Loader.add_constructor("tag:yaml.org,2002:bool", lambda l, n: _scalar(
    l, n, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), lambda t: t.lower() == "true", "true or false"))


def _expanded_size(root) -> int:
    """How many values the node graph holds with every alias expanded; refuses an alias inside itself.
    Iterative, and each node counted once, so a "billion laughs" document costs its own size."""
    sizes, open_nodes, stack = {}, set(), [(root, False)]
    while stack:
        node, closing = stack.pop()
        children = ([item for pair in node.value for item in pair] if isinstance(node, yaml.MappingNode) else
                    node.value if isinstance(node, yaml.SequenceNode) else [])
        if closing:
            open_nodes.discard(id(node))
            sizes[id(node)] = 1 + sum(sizes[id(child)] for child in children)
            if sizes[id(node)] > MAX_YAML_NODES:
                raise YAMLRefused(f"its aliases expand to more than {MAX_YAML_NODES} values (line "
                                  f"{node.start_mark.line + 1}); a config needs a few hundred")
            continue
        if id(node) in sizes:
            continue
        if id(node) in open_nodes:
            raise YAMLRefused(f"an alias refers to the value that contains it (line {node.start_mark.line + 1})")
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((child, False) for child in children if id(child) not in sizes)
    return sizes[id(root)]


def load_yaml(text):
    """Parse config text (or a stream) the way every config of this tool is read (module docstring)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    except RecursionError:
        raise YAMLRefused("it is nested too deeply") from None
    finally:
        loader.dispose()


def dump_yaml(data) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)
