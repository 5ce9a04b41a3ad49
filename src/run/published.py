"""Foreign checkpoints -> the project's models and run directories: the published CausalMER code's whole-model
files and the official DMD code's weights.

- The published code saves whole models with `torch.save(model)` (its MULTModel or CAUSALMER; docs/design.md
  § Checkpoints of the published code). They are
  read without running anything (src/run/torch_pickle.py), then converted by the converter beside the
  model they become: src/models/mult_published.py (MULTModel -> MulT), src/causal/published.py
  (CAUSALMER -> CausalMER).
- The official DMD code saves `torch.save(model.state_dict())` of its DMD; its names are mapped by
  `load_official_state_dict` in src/models/dmd.py, and the sizes its tensors declare set the config.

Before any model is built, every weight must be backed by the file (the tensors add up to no more
bytes than the file has), finite, and representable as the model's float32 without loss (no complex
values, no float64 beyond float32's range); the model is first built on the meta device and compared
shape by shape, so a file declaring widths its tensors do not have allocates nothing.

Here: `import_published` (the project's model holding a published file's weights), `published_run_config`
and `save_imported_run` (`import-checkpoint`: a run directory that eval, --remove and analyze use), and
`init_record` / `init_from_published` (`train --init-from`: a new run starting from a published file).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import OrderedDict
from pathlib import Path

import torch

from ..atomic import write_text
from ..causal.published import PUBLISHED_CAUSALMER, causalmer_plan
from ..causal.published import WEIGHTLESS_SUFFIXES as ALBERT_WEIGHTLESS
from ..data.layout import OUTPUT_DIMS, get_spec
from ..errors import CheckpointError
from ..models.albert import AlbertBranch
from ..models.branches import ResNet18Branch
from ..models.dmd import ORDER as DMD_ORDER
from ..models.dmd import load_official_state_dict
from ..models.mult import MulT
from ..models.mult_published import PUBLISHED_MULT, child, mult_params
from ..models.mult_published import WEIGHTLESS_SUFFIXES as MULT_WEIGHTLESS
from ..safe_pickle import Record
from . import checkpoint as ckpt_io
from .build import build_model
from .config import dump_config, load_config, validate
from .identity import RUN_FILE, new_identity, write_identity
from .rundir import IMPORTED_NAME
from .torch_pickle import RefusedCheckpoint, check_modules, read_torch_file, state_dict_of

log = logging.getLogger("causalmer")

__all__ = ["RefusedCheckpoint", "read_published", "read_published_state_dict", "plan_import", "import_published",
           "published_run_config", "save_imported_run", "init_record", "init_from_published"]

# Buffers of the published modules that hold no weights: left out of the strict comparison.
WEIGHTLESS_SUFFIXES = MULT_WEIGHTLESS + ALBERT_WEIGHTLESS


# ------------------------------------------------------------------------------------------ reading
def read_published(path) -> Record:
    """The record tree of a published whole-model checkpoint (zip or legacy format), validated."""
    return _as_model(read_torch_file(path), path)


def _as_model(root, path) -> Record:
    if not (isinstance(root, Record) and root.is_module):
        found = f"an object of '{root.cls}'" if isinstance(root, Record) else f"a {type(root).__name__}"
        raise RefusedCheckpoint(f"{path} does not hold a pickled model (found {found}); a published checkpoint "
                                f"is torch.save(model) of its MULTModel or CAUSALMER")
    check_modules(root, str(path))
    return root


def read_published_state_dict(path) -> OrderedDict:
    """The state_dict the pickled model would give, read without executing anything from the file."""
    return state_dict_of(read_published(path), str(path))


def file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ weights at the door
def check_weights(state: dict, source: str) -> None:
    """Refuse, naming the tensor, weights the file does not hold or that the float32 model would change:
    more bytes than the storages they view (one storage repeated under many names: each storage was
    charged to the file's size when read), NaN or inf, complex values (the imaginary part would be
    dropped), or float64 values beyond float32's range (they would become inf)."""
    total = sum(t.numel() * t.element_size() for t in state.values())
    stored = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in state.values()}.values())
    if total > stored:
        raise CheckpointError(f"{source}: its weights add up to {total} bytes, more than the {stored} bytes of the "
                              "storages they view; a checkpoint holds each weight once. The file is corrupt or crafted")
    limit = torch.finfo(torch.float32).max
    for name, tensor in state.items():
        if name.endswith(WEIGHTLESS_SUFFIXES):
            continue  # not loaded; the published position placeholder is uninitialised memory (NaN at times)
        if tensor.is_complex():
            raise CheckpointError(f"{source}: the weight {name} is complex ({tensor.dtype}); the model's weights "
                                  "are real, and dropping the imaginary part would change it. Nothing was imported")
        if not tensor.is_floating_point() or tensor.numel() == 0:
            continue
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            raise CheckpointError(f"{source}: the weight {name} holds {int((~finite).sum())} NaN or inf value(s) "
                                  f"of {tensor.numel()}; every prediction of such a model is meaningless. "
                                  "Nothing was imported")
        if tensor.dtype == torch.float64 and float(tensor.abs().max()) > limit:
            raise CheckpointError(f"{source}: the weight {name} holds values up to {float(tensor.abs().max()):.3g}, "
                                  "beyond float32's range: as the model's float32 they would become inf. "
                                  "Nothing was imported")


def _task_for(dataset: str, output_dim: int, source: str) -> str:
    tasks = [t for t in get_spec(dataset).tasks if OUTPUT_DIMS[t] == output_dim]
    if not tasks:
        valid = ", ".join(f"{OUTPUT_DIMS[t]} ({t})" for t in get_spec(dataset).tasks)
        raise CheckpointError(f"{source}: the model has {output_dim} outputs; {dataset} models have {valid}")
    return tasks[0]


# ------------------------------------------------------------------------------------------ plans
def plan_import(root: Record, dataset: str, source: str) -> dict:
    """What the project needs to rebuild a published model: the config's model section, task, feature
    sizes, sequence lengths (None: the data's), output width, and the state_dict under the project's
    names (for CausalMER or BackboneOnly)."""
    if root.cls == PUBLISHED_MULT:
        kind, mult = "mult", root
    elif root.cls == PUBLISHED_CAUSALMER:
        kind, mult = "causalmer", child(root, "tav_branch", source, "CAUSALMER")
        if mult.cls != PUBLISHED_MULT:
            raise CheckpointError(f"{source}: the CAUSALMER's tav_branch is a {mult.cls}, not a {PUBLISHED_MULT}")
    else:
        raise CheckpointError(f"{source} holds a {root.cls}; a published checkpoint holds a {PUBLISHED_MULT} "
                              f"or a {PUBLISHED_CAUSALMER}")
    trained_on = mult.get("dataset")
    if isinstance(trained_on, str) and trained_on != dataset:
        raise CheckpointError(f"{source} holds a model for {trained_on}, not {dataset}: pass --dataset {trained_on}")
    params, dims, output_dim = mult_params(mult, source)
    if dims != get_spec(dataset).dims:
        raise CheckpointError(f"{source}: the published MulT reads features of sizes {dims}; {dataset}'s are "
                              f"{get_spec(dataset).dims}")
    state = state_dict_of(root, source)
    check_weights(state, source)
    section = {"backbone": "mult", "backbone_params": params}
    if kind == "mult":
        section["name"] = "backbone"
        mapped = OrderedDict((f"backbone.{k}", v) for k, v in state.items())
    else:
        section["name"] = "causalmer"
        extra, mapped = causalmer_plan(root, state, source)
        section.update(extra)
    return {"kind": kind, "model": section, "task": _task_for(dataset, output_dim, source), "dims": dims,
            "seq_lens": None, "output_dim": output_dim, "state_dict": mapped}


def _dmd_sizes(state: dict, source: str) -> dict:
    """The DMD sizes an official state_dict's tensors declare: feature sizes, d_model, kernel sizes,
    encoder depth, output width, and the sequence lengths its homogeneous heads were built for."""
    def shape(name, dims):
        tensor = state.get(name)
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != dims:
            raise CheckpointError(f"{source}: the official DMD weights have no {dims}-d '{name}'")
        return tuple(tensor.shape)

    order = {m: i for i, m in enumerate("lav")}  # the project's (text, audio, vision) order
    dims, kernels, seq_lens = [0] * 3, [0] * 3, [0] * 3
    d_model = shape("encoder_c.weight", 3)[0]
    for m in DMD_ORDER:
        out, dim, kernel = shape(f"proj_{m}.weight", 3)
        if out != d_model:
            raise CheckpointError(f"{source}: proj_{m} has width {out}, encoder_c {d_model}")
        flat = shape(f"proj1_{m}_low.weight", 2)[1]
        if flat % d_model:
            raise CheckpointError(f"{source}: proj1_{m}_low reads {flat} features, not a multiple of d_model {d_model}")
        dims[order[m]], kernels[order[m]], seq_lens[order[m]] = dim, kernel, flat // d_model + kernel - 1
    depth = {int(match.group(1)) for key in state
             for match in [re.match(r"trans_l_with_a\.layers\.(\d+)\.", key)] if match}
    if not depth or depth != set(range(len(depth))):
        raise CheckpointError(f"{source}: the official DMD weights have no trans_l_with_a layers 0..N-1")
    return {"dims": tuple(dims), "d_model": d_model, "kernel_sizes": kernels, "layers": len(depth),
            "seq_lens": tuple(seq_lens), "output_dim": shape("out_layer.weight", 2)[0]}


def plan_dmd(state: dict, dataset: str, source: str) -> dict:
    """The plan for the official DMD's weights (`torch.save(model.state_dict())`): DMD alone, its sizes
    from the tensors, its other hyperparameters (heads, dropouts) the dataset's DMD config's."""
    check_weights(state, source)
    sizes = _dmd_sizes(state, source)
    if sizes["dims"] != get_spec(dataset).dims:
        raise CheckpointError(f"{source}: the DMD weights read features of sizes {sizes['dims']}; {dataset}'s are "
                              f"{get_spec(dataset).dims}")
    params = {key: sizes[key] for key in ("d_model", "kernel_sizes", "layers")}
    return {"kind": "dmd", "model": {"name": "backbone", "backbone": "dmd", "backbone_params": params},
            "task": _task_for(dataset, sizes["output_dim"], source), "dims": sizes["dims"],
            "seq_lens": sizes["seq_lens"], "output_dim": sizes["output_dim"], "state_dict": state}


def plan_file(path, dataset: str) -> dict:
    """The import plan of a foreign checkpoint: a published whole-model file or the official DMD's weights."""
    source = str(path)
    root = read_torch_file(path)
    if isinstance(root, dict) and root and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in root.items()):
        if "encoder_c.weight" in root and "proj1_c.weight" in root:
            return plan_dmd(root, dataset, source)
        raise CheckpointError(f"{source} holds a state_dict, but not the official DMD's (no encoder_c/proj1_c); "
                              "import-checkpoint reads the published code's whole-model files and DMD's weights")
    return plan_import(_as_model(root, path), dataset, source)


# ------------------------------------------------------------------------------------------ building
def _strict_problems(expected: dict, state: dict) -> list[str]:
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected and not k.endswith(WEIGHTLESS_SUFFIXES)]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", extra)):
        if keys:
            problems.append(f"{label} {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}")
    if not problems:
        problems += [f"{key} is {tuple(state[key].shape)} there, {tuple(t.shape)} here"
                     for key, t in expected.items() if tuple(state[key].shape) != tuple(t.shape)][:1]
    return problems


def load_strict(model: torch.nn.Module, state: dict, source: str) -> None:
    """Load every parameter and buffer of `model` from `state`; anything left over is an error, except
    the published modules' weightless buffers (WEIGHTLESS_SUFFIXES)."""
    problems = _strict_problems(model.state_dict(), state)
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + "; ".join(problems))
    model.load_state_dict({k: state[k] for k in model.state_dict()}, strict=True)


def _build(plan: dict, loss: dict, device=None) -> torch.nn.Module:
    cfg = {"model": plan["model"], "loss": loss}
    with torch.device(device) if device else torch.device("cpu"):
        return build_model(cfg, plan["dims"], plan["seq_lens"] or (None, None, None), plan["output_dim"])


def build_imported(plan: dict, loss: dict) -> torch.nn.Module:
    """The project's model for an import plan (CausalMER or BackboneOnly), holding the file's weights, in
    eval mode; `loss`: the config's loss section. It is built on the meta device first: a file whose
    tensors do not fit allocates nothing."""
    if plan["kind"] != "dmd":  # DMD's names are checked by its own loader, on sizes taken from the tensors
        problems = _strict_problems(_build(plan, loss, "meta").state_dict(), plan["state_dict"])
        if problems:
            raise CheckpointError("the published checkpoint does not fit the model: " + "; ".join(problems))
    model = _build(plan, loss)
    if plan["kind"] == "dmd":
        # The official code saves DMD alone; its two distillation units only train, so they keep their init.
        load_official_state_dict(model.backbone, plan["state_dict"], None, None)
    else:
        load_strict(model, plan["state_dict"], "the published checkpoint")
    return model.eval()


def import_published(path, dataset: str) -> torch.nn.Module:
    """The project's model holding a published checkpoint's weights, in eval mode: MulT alone for a
    MULTModel (forward -> (logits, last_hs)), CausalMER for a CAUSALMER (forward -> dict with logits_tie,
    the published logits_causal_mer, and logits_te)."""
    path = Path(path)
    plan = plan_import(read_published(path), dataset, str(path))
    model = build_imported(plan, load_config(dataset)["loss"])  # the loss weights of the dataset's config
    return model.backbone if plan["kind"] == "mult" else model


# ------------------------------------------------------------------------------------------ import-checkpoint
def published_run_config(path, dataset: str, aligned: bool = True, data_dir: str | None = None):
    """(run config, import plan) for a foreign checkpoint: the dataset's config with the file's model."""
    plan = plan_file(path, dataset)
    cli = {"data.task": plan["task"], "data.aligned": aligned, "data.dir": data_dir}
    backbone = plan["model"]["backbone"]
    cfg = load_config(dataset, backbone=backbone, model_name=plan["model"]["name"], cli=cli)
    params = {**cfg["model"]["backbone_params"], **plan["model"]["backbone_params"]}
    cfg["model"].update(plan["model"])
    cfg["model"]["backbone_params"] = params
    cfg["model"]["init_from"] = {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}
    return validate(cfg), {**plan, "model": cfg["model"]}


def save_imported_run(run_dir: Path, cfg: dict, model: torch.nn.Module, kind: str, seed: int) -> None:
    """Write the run directory of an imported model: config.yaml, its identity (run.json: trained on no data
    of this tool), best_acc.pt and best_loss.pt (one file gives one model), then imported.json, which makes
    it a run. All or nothing: a failure (a full disk)
    removes what this call wrote, so the directory never holds half an import. The caller holds its lock."""
    config_text = dump_config(cfg)
    identity = new_identity(seed, None)
    # Every plan checked that the published weights read the dataset's own feature sizes.
    weights = ckpt_io.weights_record(model, config_text, epoch=0, run=identity,
                                     feature_dims=get_spec(cfg["dataset"]).dims)
    written = []
    try:
        for name, write in ((run_dir / "config.yaml", lambda p: write_text(p, config_text)),
                            (run_dir / RUN_FILE, lambda p: write_identity(run_dir, identity)),
                            *((run_dir / ckpt_io.CHECKPOINT_NAMES[w], lambda p: ckpt_io.atomic_save(weights, p))
                              for w in ("best_acc", "best_loss")),
                            (run_dir / IMPORTED_NAME,
                             lambda p: write_text(p, json.dumps({**cfg["model"]["init_from"], "kind": kind}, indent=2)))):
            write(name)
            written.append(name)
    except BaseException:
        for name in written:
            name.unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------ --init-from
def init_record(path, recorded: dict | None = None) -> dict:
    """The config entry `model.init_from` for a published file, after checking that it reads as one.

    recorded: the entry of the run being resumed. A resumed run's weights come from last.pt, so the file
    is not needed then: the recorded entry is kept (`path` None, or naming the same file or one with the
    same content); another file is refused."""
    if recorded is not None:
        if path is None or Path(path).resolve() == Path(recorded["path"]) or (
                Path(path).is_file() and file_sha256(path) == recorded["sha256"]):
            return recorded
        raise CheckpointError(f"--init-from {path}: the run being resumed started from {recorded['path']} "
                              f"(sha256 {recorded['sha256'][:12]}...), not from this file; resume without --init-from")
    root = read_published(path)
    if root.cls not in (PUBLISHED_MULT, PUBLISHED_CAUSALMER):
        raise CheckpointError(f"--init-from {path} holds a {root.cls}, not a {PUBLISHED_MULT} or {PUBLISHED_CAUSALMER}")
    return {"path": str(Path(path).resolve()), "sha256": file_sha256(path)}


def init_from_published(model: torch.nn.Module, init: dict, dataset: str) -> None:
    """Set a new run's weights from a published file: its MulT becomes the backbone; a CAUSALMER's branches
    and constants are used where the run has branches of the same kinds, and the others keep their init."""
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
