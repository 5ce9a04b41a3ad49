"""Registries: backbones and unimodal branches are built by name.

Adding a backbone is one new module plus one line in BACKBONES ("name": "module:Class").
Entries are import paths so that an optional backbone's dependencies are only imported when used.
"""
from importlib import import_module

from ..errors import ConfigError

BACKBONES = {
    "mult": ".mult:MulT",
    "dmd": ".dmd:DMD",
    "pmr": ".pmr:PMR",
}

BRANCHES = {
    "transformer": ".branches:TransformerBranch",
    "pool": ".branches:PoolBranch",
    "resnet18": ".branches:ResNet18Branch",
    "albert": ".albert:AlbertBranch",
}


def _resolve(registry: dict, name: str, what: str):
    if name not in registry:
        raise ConfigError(f"unknown {what} '{name}'; valid names: {', '.join(sorted(registry))}")
    module, cls = registry[name].split(":")
    return getattr(import_module(module, __package__), cls)


def backbone_class(name: str):
    return _resolve(BACKBONES, name, "backbone")


def branch_class(kind: str):
    return _resolve(BRANCHES, kind, "branch kind")


def build_backbone(name: str, **cfg):
    """Build a backbone by name. cfg holds orig_dims, seq_lens, output_dim and its hyperparameters."""
    return backbone_class(name)(**cfg)


def build_branch(kind: str, **cfg):
    """Build a unimodal branch by kind. cfg holds in_dim, seq_len, output_dim and the kind's options."""
    return branch_class(kind)(**cfg)
