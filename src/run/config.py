"""Config: YAML file -> validated nested dict -> constructors.

A run's config is resolved once, in this order, later wins:
  1. configs/<dataset>.yaml            data, model (which backbone, branches, head), loss, train
  2. configs/backbones/<backbone>.yaml  that backbone's hyperparameters for the dataset (`model`) and
                                       its training overrides (`train`), merged into the above
  3. command-line flags and `--set a.b=value` overrides
The result is checked against SCHEMA (unknown keys and wrong types are errors that name the key), and
saved with the run as config.yaml.
"""
from __future__ import annotations

import copy
import inspect
import logging
import math
import re
from pathlib import Path

import yaml

from ..data.layout import DATASETS
from ..errors import ConfigError

LOG = logging.getLogger("causalmer")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
MODEL_NAMES = ("causalmer", "backbone")

# Every key a config may hold, with the type(s) its value may take. `dict` leaves are free-form
# keyword arguments checked against the constructor they are passed to.
NUM = (int, float)
OPT_NUM = (int, float, type(None))
SCHEMA = {
    "dataset": str,
    "data": {"dir": str, "aligned": bool, "task": str, "clean_nonfinite": bool,
             "file": (str, type(None)), "format": (str, type(None))},  # a data file named directly; mult | mmsa
    "model": {
        "name": str,
        "backbone": str,
        "backbone_params": dict,
        "branches": {"text": dict, "audio": dict, "vision": dict},
        "head": {"fusion": str, "constant": NUM},
        "init_from": {"path": str, "sha256": str},  # a published checkpoint the weights start from
    },
    "loss": {"alpha": NUM, "beta": NUM, "kl": str, "unimodal_labels": bool},  # branches learn their modality's label
    "train": {
        "epochs": int,
        "batch_size": int,
        "eval_batch_size": int,
        "lr": {"backbone": NUM, "text": NUM, "audio": NUM, "vision": NUM, "constant": NUM},
        "weight_decay": NUM,
        "grad_clip_norm": OPT_NUM,
        "grad_clip_value": OPT_NUM,
        "accumulate": int,
        "accumulation": str,
        "plateau": {"factor": NUM, "patience": int},
        "early_stop": (int, type(None)),
        "logger": str,
        "compile": bool,
        "missing_rate": NUM,  # training with random missing modalities: rate in [0, 1), 0 = off (train/missing.py)
        "missing_schedule": str,  # fixed (each modality at missing_rate) | uniform (half complete, r ~ U(0, rate))
    },
}
# Keys earlier versions wrote that no longer mean anything (train.num_workers was never read): dropped when
# a config is read, so old run directories still evaluate and resume.
RETIRED_KEYS = (("train", "num_workers"),)
# What the code reads without a default: a config file lacking one fails here, not after an epoch.
REQUIRED_KEYS = ("dataset", "data.dir", "data.aligned", "data.task", "data.clean_nonfinite", "model.name",
                 "model.backbone", "model.head.fusion", "loss.alpha", "loss.beta", "loss.kl", "train.epochs",
                 "train.batch_size", "train.eval_batch_size", "train.lr.backbone", "train.plateau.factor",
                 "train.plateau.patience")
CAUSALMER_REQUIRED_KEYS = ("model.branches.text", "model.branches.audio", "model.branches.vision",
                           "train.lr.text", "train.lr.audio", "train.lr.vision", "train.lr.constant")


class _Loader(yaml.SafeLoader):
    """YAML as configs mean it: like safe_load, but 1e-3 and 5E+2 are floats, as in YAML 1.2.

    PyYAML follows YAML 1.1, whose floats need a dot (1.0e-3), so `lr: 1e-3` would be the string '1e-3'."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


def load_yaml(text):
    """Parse config text (or a stream) the way every config of this tool is read."""
    return yaml.load(text, Loader=_Loader)


# Keys renamed since earlier runs were written: (section, old name, new name). An earlier run's config
# (its config.yaml, and the copy inside its checkpoints) is read with the new names.
RENAMED_KEYS = ((("model", "backbone_params"), "nlevels", "layers"),)  # DMD's depth, named as MulT's and PMR's


def upgrade_config(cfg, where: str):
    """A config written by an earlier version, in today's keys (in place): retired keys removed, renamed ones
    read under their new names, a warning naming each; `where` names the file for the messages. Both names
    of a renamed key at once are refused: the run would be ambiguous."""
    if not isinstance(cfg, dict):
        return cfg
    for section, key in RETIRED_KEYS:
        if isinstance(cfg.get(section), dict) and key in cfg[section]:
            del cfg[section][key]
            LOG.warning("%s: %s.%s is ignored (it is no longer a setting; it never had an effect)", where,
                        section, key)
    for section_path, old, new in RENAMED_KEYS:
        section = cfg
        for part in section_path:
            section = section.get(part) if isinstance(section, dict) else None
        if not isinstance(section, dict) or old not in section:
            continue
        dotted = ".".join(section_path)
        if new in section:
            raise ConfigError(f"{where} sets both {dotted}.{old} (its former name) and {dotted}.{new}; keep only {new}")
        LOG.warning("%s: %s.%s is deprecated, read as %s.%s", where, dotted, old, dotted, new)
        section[new] = section.pop(old)
    return cfg


def deep_merge(base: dict, update: dict) -> dict:
    """Return base updated recursively by update (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        with open(path) as f:
            data = load_yaml(f)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], object]:
    """'train.epochs=5' -> (['train', 'epochs'], 5); the value is read as YAML (numbers, null, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (e.g. train.epochs=5), got '{text}'")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_override(cfg: dict, path: list[str], value) -> None:
    node = cfg
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: '{part}' is not a section")
    node[path[-1]] = value


def _check(node, schema, where: str) -> None:
    if isinstance(schema, dict):
        if not isinstance(node, dict):
            raise ConfigError(f"config key '{where}' must be a section (mapping), got {node!r}")
        for key, value in node.items():
            here = f"{where}.{key}" if where else key
            if key not in schema:
                raise ConfigError(f"unknown config key '{here}'; valid keys here: {', '.join(schema)}")
            _check(value, schema[key], here)
        return
    types = schema if isinstance(schema, tuple) else (schema,)
    # YAML reads `true` as bool; bool is an int subclass, so refuse it explicitly where a number is expected.
    if isinstance(node, bool) and bool not in types:
        raise ConfigError(f"config key '{where}' must be {_type_names(types)}, got {node!r}")
    if not isinstance(node, types):
        raise ConfigError(f"config key '{where}' must be {_type_names(types)}, got {node!r}")


def _type_names(types) -> str:
    return " or ".join("null" if t is type(None) else t.__name__ for t in types)


def _require(cfg: dict, path: str):
    node = cfg
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"config is missing required key '{path}'")
        node = node[part]
    return node


def _check_finite(node, where: str) -> None:
    """Refuse NaN and +-inf anywhere, free-form sections included: a `value < 0` check lets NaN through."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_finite(value, f"{where}.{key}" if where else str(key))
    elif isinstance(node, (list, tuple)):
        for i, value in enumerate(node):
            _check_finite(value, f"{where}[{i}]")
    elif isinstance(node, float) and not math.isfinite(node):
        raise ConfigError(f"config key '{where}' must be a finite number, got {node}")


def validate(cfg: dict) -> dict:
    """Check keys, types and values; return cfg unchanged. Errors name the offending key."""
    _check(cfg, SCHEMA, "")
    _check_finite(cfg, "")
    for path in REQUIRED_KEYS:
        _require(cfg, path)
    if cfg["model"]["name"] == "causalmer":
        for path in CAUSALMER_REQUIRED_KEYS:
            _require(cfg, path)
    _check_ranges(cfg)
    dataset = cfg["dataset"]
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset '{dataset}'; valid datasets: {', '.join(DATASETS)}")
    task = cfg["data"]["task"]
    tasks = DATASETS[dataset].tasks
    if task not in tasks:
        raise ConfigError(f"data.task '{task}' is not valid for {dataset}; valid tasks: {', '.join(tasks)}")
    if cfg["model"]["name"] not in MODEL_NAMES:
        raise ConfigError(f"model.name '{cfg['model']['name']}' is unknown; valid: {', '.join(MODEL_NAMES)}")
    from ..models import BACKBONES, BRANCHES  # registries; importing them is cheap (lazy entries)
    from ..causal import check_fusion, check_kl

    if cfg["model"]["backbone"] not in BACKBONES:
        raise ConfigError(f"model.backbone '{cfg['model']['backbone']}' is unknown; valid: {', '.join(sorted(BACKBONES))}")
    check_fusion(cfg["model"]["head"]["fusion"])
    check_kl(cfg["loss"]["kl"])
    for modality, branch in cfg["model"]["branches"].items():
        if branch.get("kind") not in BRANCHES:
            raise ConfigError(f"model.branches.{modality}.kind '{branch.get('kind')}' is unknown; "
                              f"valid kinds: {', '.join(sorted(BRANCHES))}")
    train = cfg["train"]
    for key in ("epochs", "batch_size", "eval_batch_size", "accumulate"):
        if key in train and train[key] < 1:
            raise ConfigError(f"train.{key} must be at least 1, got {train[key]}")
    for key, value in train.get("lr", {}).items():
        if value < 0:
            raise ConfigError(f"train.lr.{key} must be non-negative, got {value}")
    for key in ("grad_clip_norm", "grad_clip_value"):
        if train.get(key) is not None and train[key] <= 0:
            raise ConfigError(f"train.{key} must be positive or null, got {train[key]}")
    if "accumulation" in train:
        from ..train.accumulation import check_policy

        check_policy(train["accumulation"])
    if "logger" in train:
        from ..train.tracking import check_logger

        check_logger(train["logger"])
    if not 0 < train["plateau"]["factor"] < 1:
        raise ConfigError(f"train.plateau.factor must be in (0, 1), got {train['plateau']['factor']}")
    return cfg


def _check_ranges(cfg: dict) -> None:
    """Values the optimiser, scheduler and loop would misuse or reject only once the run has started."""
    train = cfg["train"]
    if train.get("weight_decay", 0.0) < 0:
        raise ConfigError(f"train.weight_decay must be non-negative, got {train['weight_decay']}")
    if train.get("early_stop") is not None and train["early_stop"] < 1:
        raise ConfigError(f"train.early_stop must be at least 1 (epochs without a better validation loss) or "
                          f"null to never stop early, got {train['early_stop']}")
    if train["plateau"]["patience"] < 0:
        raise ConfigError(f"train.plateau.patience must be non-negative, got {train['plateau']['patience']}")
    for key in ("alpha", "beta"):
        if cfg["loss"][key] < 0:
            raise ConfigError(f"loss.{key} must be non-negative (a loss weight), got {cfg['loss'][key]}")


def check_kwargs(fn, kwargs: dict, where: str) -> None:
    """Reject config keys a constructor does not take, naming them and listing what it does take."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        valid = [name for name in params if name != "self"]
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; valid keys: {', '.join(valid)}")


def load_config(dataset: str, config_path: str | Path | None = None, backbone: str | None = None,
                model_name: str | None = None, overrides: list[str] = (), cli: dict | None = None) -> dict:
    """Resolve a run's config (see module docstring). `cli` holds flat dotted keys set by named flags."""
    if dataset not in DATASETS:
        raise ConfigError(f"unknown dataset '{dataset}'; valid datasets: {', '.join(DATASETS)}")
    path = Path(config_path) if config_path else CONFIG_DIR / f"{dataset}.yaml"
    cfg = upgrade_config(read_yaml(path), f"config file {path}")
    for section in ("data", "model", "loss", "train"):
        if section in cfg and not isinstance(cfg[section], dict):
            raise ConfigError(f"config file {path}: '{section}' must be a section (mapping), got {cfg[section]!r}")
    if cfg.get("dataset", dataset) != dataset:
        raise ConfigError(f"config file {path} is for dataset '{cfg.get('dataset')}', not '{dataset}'")
    cfg["dataset"] = dataset
    if model_name is not None:
        cfg.setdefault("model", {})["name"] = model_name
    if backbone is not None:
        cfg.setdefault("model", {})["backbone"] = backbone
    # Overrides that pick the backbone must be applied before its file is merged.
    parsed = [parse_override(text) for text in overrides]
    for key_path, value in parsed:
        if key_path[:2] in (["model", "backbone"], ["model", "name"]):
            apply_override(cfg, key_path, value)
    name = _require(cfg, "model.backbone")
    from ..models import BACKBONES

    if not isinstance(name, str):
        raise ConfigError(f"config key 'model.backbone' must be a backbone name (str), got {name!r}")
    if name not in BACKBONES:
        raise ConfigError(f"unknown backbone '{name}'; valid backbones: {', '.join(sorted(BACKBONES))}")
    backbone_file = read_yaml(CONFIG_DIR / "backbones" / f"{name}.yaml")
    if dataset not in backbone_file:
        raise ConfigError(f"configs/backbones/{name}.yaml has no section for dataset '{dataset}'")
    block = backbone_file[dataset] or {}
    cfg["model"]["backbone_params"] = deep_merge(block.get("model") or {}, cfg["model"].get("backbone_params") or {})
    cfg["train"] = deep_merge(cfg.get("train", {}), block.get("train") or {})
    for dotted, value in (cli or {}).items():
        if value is not None:
            apply_override(cfg, dotted.split("."), value)
    for key_path, value in parsed:
        apply_override(cfg, key_path, value)
    return validate(cfg)


def dump_config(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)


# Keys that choose how a run is computed or watched, not what it trains: compilation and the logger
# change no checkpoint, optimiser state or result, so a run may resume or be evaluated with other values.
EXECUTION_KEYS = (("train", "compile"), ("train", "logger"))
# The engine changes a training run's result (its dropout draws differ), so a run resumes and is reused
# only with its own; but not the weights' layout nor any evaluation (no dropout), so any engine may
# evaluate any run's checkpoint.
ENGINE_KEY = ("model", "backbone_params", "engine")


def without_execution_keys(cfg: dict, keys=EXECUTION_KEYS) -> dict:
    """A copy of cfg without `keys` (EXECUTION_KEYS), for comparing what two configs train."""
    cfg = copy.deepcopy(cfg)
    for path in keys:
        node = cfg
        for part in path[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return cfg


def model_signature(cfg: dict) -> dict:
    """The parts of a config that define a trained model: a checkpoint only loads into the same."""
    return {"dataset": cfg["dataset"], "aligned": cfg["data"]["aligned"], "task": cfg["data"]["task"],
            "model": without_execution_keys(cfg, (*EXECUTION_KEYS, ENGINE_KEY))["model"]}
