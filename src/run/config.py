"""Config: YAML file -> one schema -> a checked nested dict with every default filled -> constructors.

A run's config is resolved once, in this order, later wins:
  1. configs/<dataset>.yaml            data, model (which backbone, branches, head), loss, train
  2. configs/backbones/<backbone>.yaml  that backbone's hyperparameters for the dataset (`model`) and
                                       its training overrides (`train`), merged into the above
  3. command-line flags and `--set a.b=value` overrides; a `--set` may not contradict a flag
The result is checked against SETTINGS, the one table of every key (its type, default, allowed range or
choices, and meaning) and OPTIONS (the backbones' and branches' constructor options), defaults fill what
the files leave out, and it is saved with the run as config.yaml. The README's configuration reference is
generated from the same tables: `python -m src.run.config --markdown`.

Config files are read as YAML 1.2, with a key given twice and runaway aliases refused (src/run/yamlfile.py).
"""
from __future__ import annotations

import copy
import fnmatch
import inspect
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..causal import FUSIONS, KL_MODES
from ..data.layout import DATASETS, FORMATS
from ..errors import ConfigError
from ..modalities import MODALITIES
from ..models import BACKBONES, BRANCHES
from ..models.dmd import ORTHOGONALITY_AXES
from ..models.engine import ENGINES
from .yamlfile import YAMLRefused, dump_yaml, load_yaml

LOG = logging.getLogger("causalmer")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
MODEL_NAMES = ("causalmer", "backbone")
POLICIES = ("reference", "corrected")  # train.accumulation; what each does: src/train/accumulation.py
LOGGERS = ("none", "tensorboard", "wandb")  # train.logger; src/train/tracking.py
SCHEDULES = ("fixed", "uniform")  # train.missing_schedule; what each does: src/train/missing.py


# ------------------------------------------------------------------------------------------- the schema
class _Marker:
    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return self.text


REQUIRED = _Marker("required")                         # every config sets it
FOR_CAUSALMER = _Marker("required for causalmer")       # set when model.name is causalmer, else unused
ABSENT = _Marker("absent")                              # optional, nothing filled in when missing


@dataclass(frozen=True)
class Range:
    """low <= value <= high, either end open or missing."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value, cfg=None) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self) -> str:
        if self.high is None:
            if self.low == 0:
                return "positive" if self.low_open else "non-negative"
            return f"greater than {self.low}" if self.low_open else f"at least {self.low}"
        return f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"

    def error(self, key: str, value, cfg=None) -> str:
        return f"{key} must be {self.describe()}, got {value!r}"


@dataclass(frozen=True)
class Choices:
    values: tuple

    def allows(self, value, cfg=None) -> bool:
        return value in self.values

    def describe(self) -> str:
        return " \\| ".join(f"`{v}`" for v in self.values)

    def error(self, key: str, value, cfg=None) -> str:
        return f"{key} '{value}' is unknown; valid: {', '.join(map(str, self.values))}"


class TaskOfDataset:
    """data.task: the tasks of the config's dataset (src/data/layout.py)."""

    def allows(self, value, cfg=None) -> bool:
        return value in DATASETS[cfg["dataset"]].tasks

    def describe(self) -> str:
        return "; ".join(name + ": " + " \\| ".join(spec.tasks) for name, spec in DATASETS.items())

    def error(self, key: str, value, cfg=None) -> str:
        tasks = DATASETS[cfg["dataset"]].tasks
        return f"{key} '{value}' is not valid for {cfg['dataset']}; valid tasks: {', '.join(tasks)}"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
PROBABILITY = Range(0, 1, high_open=True)  # a dropout of 1 drops everything
NUMBER = (int, float)
NULL = type(None)


@dataclass(frozen=True)
class Setting:
    """One config key: dotted name, accepted types, default (or REQUIRED, FOR_CAUSALMER, ABSENT), the
    allowed values (a Range, Choices, TaskOfDataset or None) and what it means."""

    key: str
    types: tuple
    default: object
    allowed: object
    meaning: str
    items: int = 0  # a list of exactly this many values, each of `types` and `allowed`

    @property
    def path(self) -> tuple[str, ...]:
        return tuple(self.key.split("."))


S = Setting
SETTINGS = (
    S("dataset", (str,), REQUIRED, Choices(tuple(DATASETS)), "the dataset; fixed by `--dataset`"),
    S("data.dir", (str,), REQUIRED, None, "folder of the data pickles (`--data-dir`)"),
    S("data.aligned", (bool,), REQUIRED, None, "the word-aligned files; false: the unaligned ones (`--unaligned`)"),
    S("data.task", (str,), REQUIRED, TaskOfDataset(), "what is predicted (`--task`): cls = 7 classes, "
      "regression = the score (L1), binary = four emotion pairs"),
    S("data.clean_nonfinite", (bool,), REQUIRED, None, "replace NaN/±inf outside audio by 0 instead of refusing "
      "the file (`--clean-nonfinite`)"),
    S("data.file", (str, NULL), None, None, "the data pickle itself (`--data-file`); null: data.dir's file-name rule"),
    S("data.format", (str, NULL), None, Choices(FORMATS), "insist on this layout of the data file (`--data-format`); "
      "null: the one its keys show"),
    S("model.name", (str,), REQUIRED, Choices(MODEL_NAMES), "causalmer = backbone + three branches + causal head; "
      "backbone = the backbone alone (`--model`)"),
    S("model.backbone", (str,), REQUIRED, Choices(tuple(BACKBONES)), "the backbone (`--backbone`); its options "
      "come from configs/backbones/<backbone>.yaml"),
    S("model.backbone_params", (dict,), {}, None, "the backbone's constructor options (table below)"),
    *(S(f"model.branches.{m}", (dict,), FOR_CAUSALMER, None, f"the {m} branch: `kind` and its constructor "
        "options (table below)") for m in MODALITIES),
    *(S(f"model.branches.{m}.kind", (str,), FOR_CAUSALMER, Choices(tuple(BRANCHES)), f"the {m} branch's kind")
      for m in MODALITIES),
    S("model.head.fusion", (str,), REQUIRED, Choices(tuple(FUSIONS)), "how the causal head fuses the backbone's "
      "and the branches' logits"),
    S("model.head.constant", NUMBER, 0.0, None, "initial counterfactual constants c_t, c_a, c_v"),
    S("model.init_from.path", (str,), ABSENT, None, "a published checkpoint the weights start from "
      "(`--init-from`; written by the tool)"),
    S("model.init_from.sha256", (str,), ABSENT, None, "that file's SHA-256 (written by the tool)"),
    S("loss.alpha", NUMBER, REQUIRED, NON_NEGATIVE, "weight of the task losses (fused + three branches)"),
    S("loss.beta", NUMBER, REQUIRED, NON_NEGATIVE, "weight of the KL term that trains the constants"),
    S("loss.kl", (str,), REQUIRED, Choices(KL_MODES), "all = softmax over all logits; pair = per emotion pair "
      "(iemocap)"),
    S("loss.unimodal_labels", (bool,), False, None, "each branch learns from its own modality's label (data "
      "files with one label per modality: sims)"),
    S("train.epochs", (int,), REQUIRED, AT_LEAST_1, "epochs (`--epochs`)"),
    S("train.batch_size", (int,), REQUIRED, AT_LEAST_1, "training batch size"),
    S("train.eval_batch_size", (int,), REQUIRED, AT_LEAST_1, "evaluation batch size"),
    S("train.lr.backbone", NUMBER, REQUIRED, NON_NEGATIVE, "Adam learning rate of the backbone"),
    *(S(f"train.lr.{m}", NUMBER, FOR_CAUSALMER, NON_NEGATIVE, f"learning rate of the {m} branch") for m in MODALITIES),
    S("train.lr.constant", NUMBER, FOR_CAUSALMER, NON_NEGATIVE, "learning rate of the three constants"),
    S("train.weight_decay", NUMBER, 0.0, NON_NEGATIVE, "Adam weight decay"),
    S("train.grad_clip_norm", (*NUMBER, NULL), None, POSITIVE, "clip the gradients' norm to this; null: no clip"),
    S("train.grad_clip_value", (*NUMBER, NULL), None, POSITIVE, "clip each gradient value to ±this; null: no clip"),
    S("train.accumulate", (int,), 1, AT_LEAST_1, "batches per optimiser step"),
    S("train.accumulation", (str,), "corrected", Choices(POLICIES), "with accumulate > 1: corrected = mean "
      "gradient per step; reference = DMD's procedure (src/train/accumulation.py)"),
    S("train.plateau.factor", NUMBER, REQUIRED, Range(0, 1, True, True), "ReduceLROnPlateau factor on the "
      "validation loss"),
    S("train.plateau.patience", (int,), REQUIRED, NON_NEGATIVE, "ReduceLROnPlateau patience (epochs)"),
    S("train.early_stop", (int, NULL), None, AT_LEAST_1, "stop after this many epochs without a better "
      "validation loss; null: never"),
    S("train.logger", (str,), "none", Choices(LOGGERS), "per-epoch scalars to TensorBoard in <run>/tensorboard "
      "or to W&B in <run>/wandb (`--logger`)"),
    S("train.compile", (bool,), False, None, "torch.compile the model for training and evaluation (`--compile`)"),
    S("train.missing_rate", NUMBER, 0.0, PROBABILITY, "train with random missing modalities (zeroed inputs) at "
      "this rate; 0: off"),
    S("train.missing_schedule", (str,), "fixed", Choices(SCHEDULES), "fixed = each modality missing with "
      "probability missing_rate; uniform = half the samples complete, the others at a rate drawn in "
      "[0, missing_rate)"),
)
BY_KEY = {setting.key: setting for setting in SETTINGS}
# Sections whose other keys are constructor options: checked against OPTIONS here and against the
# constructor's signature when the model is built (src/run/build.py).
OPTION_SECTIONS = ("model.backbone_params", *(f"model.branches.{m}" for m in MODALITIES))
# Options the data gives a constructor: a config may not set them.
DATA_GIVEN = ("orig_dims", "seq_lens", "output_dim", "in_dim", "seq_len")

# The backbones' and branches' options with one meaning wherever they appear. `name` may be a pattern
# (fnmatch). An option listed nowhere is checked by its constructor alone.
OPTIONS = (
    S("*dropout*", NUMBER, ABSENT, PROBABILITY, "a dropout probability (attn_dropout, attn_dropout_a, "
      "attn_dropout_v, relu_dropout, res_dropout, embed_dropout, out_dropout, text_dropout, dropout)"),
    S("d_model", (int,), ABSENT, AT_LEAST_1, "model width; a multiple of the attention heads"),
    S("num_heads", (int,), ABSENT, AT_LEAST_1, "attention heads (MulT uses 10 unless use_configured_heads)"),
    S("layers", (int,), ABSENT, AT_LEAST_1, "encoder depth"),
    S("kernel_sizes", (int,), ABSENT, AT_LEAST_1, "Conv1d kernel per modality (text, audio, vision); each at "
      "most its modality's sequence length", items=len(MODALITIES)),
    S("hidden", (int,), ABSENT, AT_LEAST_1, "hidden width (pool branch)"),
    S("width", (int,), ABSENT, AT_LEAST_1, "channel width (resnet18 branch)"),
    S("gd_size_*", (int,), ABSENT, AT_LEAST_1, "DMD's graph distillation widths"),
    S("*_weight", NUMBER, ABSENT, NON_NEGATIVE, "DMD's loss weights"),
    S("margin", NUMBER, ABSENT, NON_NEGATIVE, "DMD's similarity margin"),
    S("attn_mask", (bool,), ABSENT, None, "MulT's shifted future mask in the encoders"),
    S("use_configured_heads", (bool,), ABSENT, None, "MulT: use num_heads instead of the reference's 10"),
    S("orthogonality_axis", (str,), ABSENT, Choices(ORTHOGONALITY_AXES), "DMD: the axis of its orthogonality loss"),
    S("engine", (str,), ABSENT, Choices(("auto", *ENGINES)), "how the encoders are computed; auto = fast on the "
      "CPU, plain elsewhere. The weights are the same, the dropout draws are not: a run resumes only with "
      "its own engine; any engine evaluates it"),
)


def option_setting(name: str) -> Setting | None:
    """The OPTIONS row an option name falls under (exact names before patterns)."""
    exact = next((o for o in OPTIONS if o.key == name), None)
    return exact or next((o for o in OPTIONS if fnmatch.fnmatchcase(name, o.key)), None)


def _cross_checks(cfg: dict) -> None:
    """Rules between keys of one option section (the rules of one key are in the tables)."""
    for dotted in OPTION_SECTIONS:
        section = get_path(cfg, dotted.split("."))
        if not isinstance(section, dict):
            continue
        d_model, heads = section.get("d_model"), section.get("num_heads")
        if isinstance(d_model, int) and isinstance(heads, int) and d_model % heads:
            raise ConfigError(f"{dotted}.d_model ({d_model}) must be a multiple of {dotted}.num_heads ({heads}): "
                              "each attention head takes an equal share of the width")


CROSS_RULES = ("`d_model` is a multiple of `num_heads` (for MulT: of 10 unless `use_configured_heads`)",
               "each of `kernel_sizes` is at most the data's sequence length of its modality (checked when the "
               "data is opened, before the run directory exists)",
               "`--set` may not contradict a command-line flag (`--dataset`, `--backbone`/`--model`, `--epochs`, "
               "...)")


# --------------------------------------------------------------------------------------------- files
def dump_config(cfg: dict) -> str:
    return dump_yaml(cfg)


def read_yaml(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not a UTF-8 text file (byte {err.start} cannot be read); "
                          "is it the right file?") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, not {type(data).__name__}")
    return data


# ------------------------------------------------------------------------------ earlier versions' keys
# Keys earlier versions wrote that no longer mean anything (train.num_workers was never read): dropped when
# a config is read, so old run directories still evaluate and resume.
RETIRED_KEYS = (("train", "num_workers"),)
# Keys renamed since earlier runs were written: (section, old name, new name). An earlier run's config
# (its config.yaml, and the copy inside its checkpoints) is read with the new names.
RENAMED_KEYS = ((("model", "backbone_params"), "nlevels", "layers"),)  # DMD's depth, named as MulT's and PMR's


def upgrade_config(cfg, where: str):
    """A config written by an earlier version, in today's keys (in place): retired keys removed, renamed ones
    read under their new names, a warning naming each; `where` names the file for the messages. Both names
    of a renamed key at once are refused: the run would be ambiguous. Defaults are filled by fill_defaults."""
    if not isinstance(cfg, dict):
        return cfg
    for section, key in RETIRED_KEYS:
        if isinstance(cfg.get(section), dict) and key in cfg[section]:
            del cfg[section][key]
            LOG.warning("%s: %s.%s is ignored (it is no longer a setting; it never had an effect)", where,
                        section, key)
    for section_path, old, new in RENAMED_KEYS:
        section = get_path(cfg, section_path)
        if not isinstance(section, dict) or old not in section:
            continue
        dotted = ".".join(section_path)
        if new in section:
            raise ConfigError(f"{where} sets both {dotted}.{old} (its former name) and {dotted}.{new}; keep only {new}")
        LOG.warning("%s: %s.%s is deprecated, read as %s.%s", where, dotted, old, dotted, new)
        section[new] = section.pop(old)
    return cfg


def fill_defaults(cfg: dict) -> dict:
    """Give every key with a default its default where the config lacks it (in place), inside sections the
    config has: a config written before a key existed reads as it ran."""
    if not isinstance(cfg, dict):
        return cfg
    for setting in SETTINGS:
        if isinstance(setting.default, _Marker):
            continue
        *parents, last = setting.path
        section = get_path(cfg, parents)
        if isinstance(section, dict) and last not in section:
            section[last] = copy.deepcopy(setting.default)
    return cfg


# ------------------------------------------------------------------------------------------ checking
def get_path(cfg, path):
    """cfg[path[0]][path[1]]..., or None where a part is missing."""
    node = cfg
    for part in path:
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _type_names(types, items: int = 0) -> str:
    if items:
        return f"list of {items} {_type_names(types)}"
    return " or ".join("null" if t is NULL else "number" if t is float else "mapping" if t is dict else t.__name__
                       for t in types if not (t is int and float in types))


def _check_type(value, setting: Setting, where: str) -> None:
    values = value if setting.items else [value]
    if setting.items and (not isinstance(value, list) or len(value) != setting.items):
        raise ConfigError(f"config key '{where}' must be a {_type_names(setting.types, setting.items)}, got {value!r}")
    for item in values:
        # YAML reads `true` as bool; bool is an int subclass, so refuse it where a number is expected.
        if not isinstance(item, setting.types) or (isinstance(item, bool) and bool not in setting.types):
            raise ConfigError(f"config key '{where}' must be {_type_names(setting.types)}, got {value!r}")


def _check_allowed(value, setting: Setting, where: str, cfg: dict) -> None:
    if setting.allowed is None or value is None:
        return
    for item in (value if setting.items else [value]):
        if not setting.allowed.allows(item, cfg):
            raise ConfigError(f"{setting.allowed.error(where, item, cfg)} ({where}: {_plain(setting.meaning)})")


def _plain(meaning: str) -> str:
    """A meaning as a message prints it (the tables' Markdown quotes dropped)."""
    return meaning.replace("`", "").replace("\\|", "|")


def check_setting(key: str, value):
    """Refuse a value the schema does not allow for `key` (for code that receives one value alone)."""
    setting = BY_KEY[key]
    _check_type(value, setting, key)
    _check_allowed(value, setting, key, {})
    return value


def _children(prefix: tuple) -> dict:
    """{name: Setting or None (a section)} of the schema keys directly under `prefix`."""
    out = {}
    for setting in SETTINGS:
        if setting.path[:len(prefix)] == prefix and len(setting.path) > len(prefix):
            name = setting.path[len(prefix)]
            out[name] = BY_KEY.get(".".join(prefix + (name,)))
    return out


def _walk(node, prefix: tuple) -> None:
    """Unknown keys and wrong types, by name, from the root down."""
    where = ".".join(prefix)
    if not isinstance(node, dict):
        raise ConfigError(f"config key '{where}' must be a section (mapping), got {node!r}")
    children = _children(prefix)
    options = where in OPTION_SECTIONS
    for key, value in node.items():
        here = f"{where}.{key}" if where else str(key)
        if key in children:
            setting = children[key]
            if setting is None or here in OPTION_SECTIONS:
                _walk(value, prefix + (key,))
            else:
                _check_type(value, setting, here)
        elif options:
            _check_option(key, value, here)
        else:
            raise ConfigError(f"unknown config key '{here}'; valid keys here: {', '.join(children)}")


def _check_option(name, value, where: str) -> None:
    if name in DATA_GIVEN:
        raise ConfigError(f"{where} comes from the data; a config cannot set it")
    setting = option_setting(str(name))
    if setting is not None:
        _check_type(value, setting, where)


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
    """Check every key against the schema: known, of its type, finite, present where required, in its
    range or choices, and the rules between keys. Returns cfg; errors name the key."""
    _walk(cfg, ())
    _check_finite(cfg, "")
    causalmer = get_path(cfg, ("model", "name")) == "causalmer"
    for setting in SETTINGS:
        value = get_path(cfg, setting.path)
        if value is None and (setting.default is REQUIRED or (setting.default is FOR_CAUSALMER and causalmer)):
            *parents, last = setting.path
            if last not in (get_path(cfg, parents) or {}):
                raise ConfigError(f"config is missing required key '{setting.key}' ({_plain(setting.meaning)})")
        _check_allowed(value, setting, setting.key, cfg)
    for dotted in OPTION_SECTIONS:
        for name, value in (get_path(cfg, dotted.split(".")) or {}).items():
            setting = option_setting(str(name)) if name != "kind" else None
            if setting is not None:
                _check_allowed(value, setting, f"{dotted}.{name}", cfg)
    _cross_checks(cfg)
    return cfg


def check_kwargs(fn, kwargs: dict, where: str) -> None:
    """Reject config keys a constructor does not take, naming them and listing what it does take."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        valid = [name for name in params if name != "self"]
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where}; valid keys: {', '.join(valid)}")


def check_kernel_sizes(params: dict, seq_lens, where: str) -> None:
    """A Conv1d kernel longer than its sequence has no output: refused when the data's lengths are known."""
    kernels = params.get("kernel_sizes")
    if kernels is None or seq_lens is None:
        return
    for modality, kernel, length in zip(MODALITIES, kernels, seq_lens):
        if length is not None and kernel > length:
            raise ConfigError(f"{where}.kernel_sizes: the {modality} kernel size {kernel} is longer than the "
                              f"{modality} sequences of the data ({length} steps); choose a kernel of at most "
                              f"{length}")


# -------------------------------------------------------------------------------------------- resolving
def parse_override(text: str) -> tuple[list[str], object]:
    """'train.epochs=5' -> (['train', 'epochs'], 5); the value is read as YAML (numbers, null, lists), except
    for a key the schema types as text, which takes the text as written (`--set data.dir=2024`)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key=value (e.g. train.epochs=5), got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except YAMLRefused as err:
        raise ConfigError(f"--set {key}: {err}") from None
    except yaml.YAMLError:
        value = raw
    setting = BY_KEY.get(key)
    if setting is not None and setting.types == (str,) and isinstance(value, (bool, int, float, type(None))):
        value = raw.strip()  # a name that YAML would read as a number, boolean or null
    return key.split("."), value


def apply_override(cfg: dict, path: list[str], value) -> None:
    node = cfg
    for part in path[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {'.'.join(path)}: '{part}' is not a section")
    node[path[-1]] = value


def _require(cfg: dict, path: str):
    node = get_path(cfg, path.split("."))
    if node is None:
        raise ConfigError(f"config is missing required key '{path}'")
    return node


def deep_merge(base: dict, update: dict) -> dict:
    """Return base updated recursively by update (neither is modified)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _refuse_contradictions(parsed: list, fixed: dict) -> None:
    """A `--set` of a key that a flag of the same command gives, to another value, is a contradiction."""
    for key_path, value in parsed:
        dotted = ".".join(key_path)
        if dotted in fixed and value != fixed[dotted]:
            flag = "--dataset" if dotted == "dataset" else "a command-line flag"
            raise ConfigError(f"--set {dotted}={value} contradicts {flag}, which gives {dotted} = {fixed[dotted]}"
                              f"{' (it names the run directory and its data)' if dotted == 'dataset' else ''}; "
                              "give the value once")


def load_config(dataset: str, config_path: str | Path | None = None, backbone: str | None = None,
                model_name: str | None = None, overrides: list[str] = (), cli: dict | None = None) -> dict:
    """Resolve a run's config (see module docstring). `cli` holds flat dotted keys set by named flags;
    `dataset` and a given `backbone` are fixed by the command line too."""
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
    parsed = [parse_override(text) for text in overrides]
    fixed = {"dataset": dataset, **{k: v for k, v in (cli or {}).items() if v is not None}}
    if backbone is not None:
        fixed["model.backbone"] = backbone
    _refuse_contradictions(parsed, fixed)
    if model_name is not None:
        cfg.setdefault("model", {})["name"] = model_name
    if backbone is not None:
        cfg.setdefault("model", {})["backbone"] = backbone
    # Overrides that pick the backbone must be applied before its file is merged.
    for key_path, value in parsed:
        if key_path[:2] in (["model", "backbone"], ["model", "name"]):
            apply_override(cfg, key_path, value)
    name = _require(cfg, "model.backbone")
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
    return validate(fill_defaults(cfg))


# ------------------------------------------------------------------------------------- run identity
# Keys that choose how a run is computed or watched and change nothing it computes: compilation and the
# logger. A run resumes, and compare reuses it, whatever their values.
EXECUTION_KEYS = (("train", "compile"), ("train", "logger"))
# The engine computes the same function of the same parameters, but draws dropout differently: training
# with another engine is another experiment (it is no execution key), yet any engine evaluates the weights.
ENGINE_KEY = ("model", "backbone_params", "engine")


def without_execution_keys(cfg: dict, keys=EXECUTION_KEYS) -> dict:
    """A copy of cfg without `keys` (EXECUTION_KEYS), for comparing what two configs train."""
    cfg = copy.deepcopy(cfg)
    for path in keys:
        node = get_path(cfg, path[:-1])
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return cfg


def model_signature(cfg: dict) -> dict:
    """The parts of a config that define a trained model: a checkpoint only loads into the same."""
    return {"dataset": cfg["dataset"], "aligned": cfg["data"]["aligned"], "task": cfg["data"]["task"],
            "model": without_execution_keys(cfg, (*EXECUTION_KEYS, ENGINE_KEY))["model"]}


# ------------------------------------------------------------------------------------------ reference
def _default_text(setting: Setting) -> str:
    if isinstance(setting.default, _Marker):
        return "—" if setting.default is ABSENT else str(setting.default)
    return "`" + dump_config(setting.default).strip().removesuffix("...").strip() + "`"


def _allowed_text(setting: Setting) -> str:
    allowed = "" if setting.allowed is None else setting.allowed.describe()
    if setting.items:
        allowed = f"each {allowed}"
    return allowed


def markdown_reference() -> str:
    """The README's configuration reference, generated from SETTINGS, OPTIONS and CROSS_RULES."""
    lines = ["| key | type | default | allowed | meaning |", "|---|---|---|---|---|"]
    for s in SETTINGS:
        lines.append(f"| `{s.key}` | {_type_names(s.types)} | {_default_text(s)} | {_allowed_text(s)} | {s.meaning} |")
    lines += ["", "Options of `model.backbone_params` and `model.branches.<modality>` (beside `kind`), wherever a "
              "backbone or branch takes them; any other option is checked by its constructor. Options the data "
              f"gives ({', '.join(f'`{k}`' for k in DATA_GIVEN)}) cannot be set.", "",
              "| option | type | allowed | meaning |", "|---|---|---|---|"]
    for s in OPTIONS:
        lines.append(f"| `{s.key}` | {_type_names(s.types, s.items)} | {_allowed_text(s)} | {s.meaning} |")
    lines += ["", "Rules between keys:", *(f"- {rule}" for rule in CROSS_RULES)]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m src.run.config --markdown   (prints the README's configuration reference)")
    print(markdown_reference(), end="")
