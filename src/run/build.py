"""Build what a config describes: its data splits, its model, and the model's optimiser parameter groups."""
from __future__ import annotations

import contextlib

import torch

from ..causal import CausalHead, CausalMER
from ..data import load_splits
from ..errors import ConfigError
from ..models import backbone_class, branch_class, build_backbone, build_branch
from ..models.standalone import BackboneOnly
from ..modalities import MODALITIES
from .config import check_kernel_sizes, check_kwargs


def load_data(cfg: dict) -> dict:
    """Every split of the run's data file (data.file, else data.dir's file for the dataset)."""
    data = cfg["data"]
    return load_splits(data["dir"], cfg["dataset"], aligned=data["aligned"], task=data["task"],
                       clean_nonfinite=data["clean_nonfinite"], data_file=data["file"],
                       data_format=data["format"])


def make_model(cfg: dict, dataset, device: torch.device) -> torch.nn.Module:
    """The config's model for the data of `dataset` (its feature sizes, lengths and classes), on `device`;
    any split will do: a file's splits share them."""
    return build_model(cfg, dataset.dims, dataset.seq_lens, dataset.output_dim).to(device)


def build_model(cfg: dict, dims, seq_lens, output_dim: int) -> torch.nn.Module:
    """CausalMER (backbone + three branches + causal head) or the backbone alone, per model.name."""
    model_cfg = cfg["model"]
    name = model_cfg["backbone"]
    params = dict(model_cfg["backbone_params"])
    check_kwargs(backbone_class(name), params, f"the '{name}' backbone's config (model.backbone_params)")
    check_kernel_sizes(params, seq_lens, "model.backbone_params")
    with named_section("model.backbone_params"):
        backbone = build_backbone(name, orig_dims=list(dims), seq_lens=list(seq_lens), output_dim=output_dim, **params)
    if model_cfg["name"] == "backbone":
        return BackboneOnly(backbone)

    branches = []
    for modality, in_dim, seq_len in zip(MODALITIES, dims, seq_lens):
        options = dict(model_cfg["branches"][modality])
        kind = options.pop("kind")
        check_kwargs(branch_class(kind), options, f"model.branches.{modality}")
        with named_section(f"model.branches.{modality}"):
            branches.append(build_branch(kind, in_dim=in_dim, seq_len=seq_len, output_dim=output_dim, **options))
    head = CausalHead(**model_cfg["head"])
    loss = cfg["loss"]
    return CausalMER(backbone, *branches, head, alpha=loss["alpha"], beta=loss["beta"], kl=loss["kl"],
                     unimodal_labels=loss["unimodal_labels"])


@contextlib.contextmanager
def named_section(where: str):
    """A constructor's refusal of its options (ConfigError) names the config section they came from."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def param_groups(model: torch.nn.Module, lr: dict) -> list[dict]:
    """Adam groups with the per-part learning rates of the config, as the model declares its parts
    (CausalMER: backbone, each branch, each constant; the backbone alone: one group)."""
    groups = [{"params": params, "lr": lr[lr_key], "name": name} for name, lr_key, params in model.parameter_groups()]
    counted = sum(len(g["params"]) for g in groups)
    if counted != len(list(model.parameters())):
        raise RuntimeError("parameter groups do not cover every parameter of the model exactly once")
    return groups


def make_optimizer(model: torch.nn.Module, tcfg: dict, fused: bool = True) -> torch.optim.Adam:
    """Adam over the per-part groups. The fused kernel (CPU and CUDA) updates every tensor in one pass,
    where the default loops over them (the speed benchmark's --optimizer rows compare the two).
    `fused=False` is for devices the fused kernel does not support (the meta device of the placement
    tests)."""
    return torch.optim.Adam(param_groups(model, tcfg["lr"]), weight_decay=tcfg["weight_decay"], fused=fused)


def compile_model(model: torch.nn.Module, backend: str = "inductor") -> torch.nn.Module:
    """torch.compile (train.compile, --compile) for the training step and evaluation.

    The compiled wrapper shares the module's parameters and stores the module as `_orig_mod`; callers
    keep the uncompiled module for state_dict and load_state_dict, so checkpoints have the same keys
    with or without compilation."""
    return torch.compile(model, backend=backend)
