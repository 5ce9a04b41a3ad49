"""Nested dicts (configs, metrics) as flat {joined key: leaf} mappings."""
from __future__ import annotations


def flatten(tree: dict, sep: str = ".", prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: every leaf that is not a dict under its path joined by `sep`, in the
    tree's order; an empty dict leaves no entry."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        if isinstance(value, dict):
            flat.update(flatten(value, sep, name))
        else:
            flat[name] = value
    return flat
