"""The published code's CAUSALMER (`src.causal_mer_model.CAUSALMER`, pickled whole) -> the project's CausalMER.

Its `tav_branch` is a published MULTModel (src/models/mult_published.py); its text branch an ALBERT whose
pickled AlbertConfig gives the project's AlbertBranch its config; its audio and vision branches are
torchvision ResNet-18s (conv1 for one channel) whose names map onto ResNet18Branch's; its constants and
fusion go to the causal head. `causalmer_plan` gives the config's model section for all of that and the
state_dict under the project's names, everything read from the inert records of src/safe_pickle.py.
"""
from __future__ import annotations

import inspect
import re
from collections import OrderedDict

from ..errors import CheckpointError
from ..models.albert import _import_transformers
from ..models.mult_published import child
from ..safe_pickle import Record
from .head import FUSIONS

PUBLISHED_CAUSALMER = "src.causal_mer_model.CAUSALMER"
# ALBERT's index tables: buffers that hold no weights (persistent in older transformers releases).
WEIGHTLESS_SUFFIXES = ("embeddings.position_ids", "embeddings.token_type_ids")

# The AlbertConfig attributes that define the network (not the generic output and bookkeeping options).
ALBERT_FIELDS = ("vocab_size", "embedding_size", "hidden_size", "num_hidden_layers", "num_hidden_groups",
                 "num_attention_heads", "intermediate_size", "inner_group_num", "hidden_act", "hidden_dropout_prob",
                 "attention_probs_dropout_prob", "max_position_embeddings", "type_vocab_size", "initializer_range",
                 "layer_norm_eps", "classifier_dropout_prob", "position_embedding_type", "pad_token_id",
                 "bos_token_id", "eos_token_id")

def _albert_config(text: Record, source: str) -> dict:
    """The architecture fields of the pickled AlbertConfig record, as AlbertBranch's `config`."""
    albert = child(text, "model", source, "text branch")
    config = albert.get("config")
    if not (isinstance(config, Record) and config.cls.endswith(".AlbertConfig")):
        raise CheckpointError(f"{source}: the published text branch's ALBERT has no pickled AlbertConfig "
                              f"(found {_name(config)})")
    accepted = inspect.signature(_import_transformers().AlbertConfig.__init__).parameters
    plain = (bool, int, float, str, type(None))
    return {k: v for k, v in config.state.items() if k in ALBERT_FIELDS and k in accepted and isinstance(v, plain)}


def _resnet_width(branch: Record, source: str, where: str) -> int:
    """The width of a published torchvision ResNet-18 branch (conv1's output channels)."""
    conv1 = child(branch, "conv1", source, where)
    weight = conv1.state["_parameters"].get("weight")
    if (weight is None or weight.dim() != 4 or tuple(weight.shape[1:]) != (1, 7, 7)
            or conv1.get("stride") != (2, 2) or conv1.get("padding") != (3, 3)):
        raise CheckpointError(f"{source}: the published {where}.conv1 is not Conv2d(1, width, 7, stride 2, padding 3)")
    for stage in range(1, 5):
        blocks = child(branch, f"layer{stage}", source, where).state["_modules"]
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


def _map_names(state: dict, source: str) -> OrderedDict:
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


def causalmer_plan(root: Record, state: dict, source: str) -> tuple[dict, OrderedDict]:
    """(the model section's branches and head, the state_dict under CausalMER's names) of a CAUSALMER
    record whose state_dict (published names) is `state`."""
    text = child(root, "t_branch", source, "CAUSALMER")
    for name in ("linear_transformation", "model", "text_mlp"):
        child(text, name, source, "text branch (src.model_t.AlbertTextModel)")
    audio = child(child(root, "a_branch", source, "CAUSALMER"), "a_branch", source, "a_branch")
    vision = child(child(root, "v_branch", source, "CAUSALMER"), "v_branch", source, "v_branch")
    section = {"branches": {"text": {"kind": "albert", "config": _albert_config(text, source)},
                            "audio": {"kind": "resnet18", "width": _resnet_width(audio, source, "a_branch.a_branch")},
                            "vision": {"kind": "resnet18", "width": _resnet_width(vision, source, "v_branch.v_branch")}}}
    fusion = root.get("fusion_mode")
    if fusion not in FUSIONS:
        raise CheckpointError(f"{source}: the published CAUSALMER's fusion_mode is {fusion!r}; known fusions: "
                              f"{', '.join(FUSIONS)}")
    section["head"] = {"fusion": fusion, "constant": 0.0}
    state = OrderedDict(state)
    for key in ("constant_t", "constant_a", "constant_v"):
        constant = root.state["_parameters"].get(key)
        if constant is None or constant.numel() != 1:
            raise CheckpointError(f"{source}: the published CAUSALMER's {key} is not a scalar parameter")
        state[key] = constant.reshape(())
    return section, _map_names(state, source)
