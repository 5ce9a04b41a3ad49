"""The published code's MulT (its `src.models.MULTModel`, pickled whole by torch.save) -> the project's MulT.

The published MULTModel's state_dict names are exactly this MulT's (src/models/mult.py), so its weights
load as they are; what a whole-model file adds is the hyperparameters, held as the pickled model's
attributes. `mult_params` recovers them from the inert record of that object (src/safe_pickle.py's
`Record`), checking every encoder's own attributes and every projection's weight shape against them, so
a file the project's MulT cannot reproduce, or one declaring widths its tensors do not have, is refused
before a model is built.
"""
from __future__ import annotations

from ..errors import CheckpointError
from ..safe_pickle import Record
from .mult import CROSSMODAL_NAMES, MEMORY_NAMES, REFERENCE_NUM_HEADS

PUBLISHED_MULT = "src.models.MULTModel"
MULT_DROPOUTS = ("attn_dropout", "attn_dropout_a", "attn_dropout_v", "relu_dropout", "res_dropout",
                 "embed_dropout", "out_dropout")
# Buffers of the published encoders that hold no weights: the encoder version and the position-table
# placeholder (the table itself is computed).
WEIGHTLESS_SUFFIXES = (".version", ".embed_positions._float_tensor")


def attribute(record: Record, name: str, types, source: str, where: str):
    value = record.get(name)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,))):
        raise CheckpointError(f"{source}: the published {where} ({record.cls}) has no usable attribute "
                              f"'{name}' (found {value!r})")
    return value


def child(record: Record, name: str, source: str, where: str) -> Record:
    child = record.state["_modules"].get(name)
    if child is None:
        raise CheckpointError(f"{source}: the published {where} ({record.cls}) has no submodule '{name}'")
    return child


def mult_params(mult: Record, source: str) -> tuple[dict, tuple, int]:
    """The project's MulT keywords, the feature sizes and the output width of a published MULTModel record.

    Every value comes from the record's attributes; its encoders' own attributes are checked against
    them, so a file the project's MulT cannot reproduce is refused instead of imported wrongly.
    """
    where = "MULTModel"
    for flag in ("lonly", "aonly", "vonly"):
        if mult.get(flag, True) is not True:
            raise CheckpointError(f"{source}: the published MULTModel was built with {flag}=False (a partial MulT); "
                                  "the project's MulT has all three crossmodal targets")
    dims = tuple(attribute(mult, f"orig_d_{m}", int, source, where) for m in "lav")
    widths = {attribute(mult, f"d_{m}", int, source, where) for m in "lav"}
    if len(widths) != 1:
        raise CheckpointError(f"{source}: the published MULTModel has per-modality widths d_l, d_a, d_v = "
                              f"{sorted(widths)}; the project's MulT has one d_model")
    d_model = widths.pop()
    layers = attribute(mult, "layers", int, source, where)
    params = {"d_model": d_model, "layers": layers}
    for name in MULT_DROPOUTS:
        params[name] = float(attribute(mult, name, (int, float), source, where))
    params["attn_mask"] = attribute(mult, "attn_mask", bool, source, where)

    kernels = []
    for m in "lav":
        conv = child(mult, f"proj_{m}", source, where)
        kernel = attribute(conv, "kernel_size", tuple, source, f"proj_{m}")
        weight = conv.state["_parameters"].get("weight")
        if (len(kernel) != 1 or conv.get("padding") not in ((0,), 0) or conv.state["_parameters"].get("bias") is not None
                or weight is None or tuple(weight.shape) != (d_model, dims["lav".index(m)], kernel[0])):
            raise CheckpointError(f"{source}: the published proj_{m} is not a Conv1d({dims['lav'.index(m)]} -> "
                                  f"{d_model}, kernel k, padding 0, no bias) as MulT's projections are")
        kernels.append(kernel[0])
    params["kernel_sizes"] = kernels

    # Encoders: depth, attention dropout (by source modality), heads and the other dropouts, as MulT builds them.
    by_source = {"l": params["attn_dropout"], "a": params["attn_dropout_a"], "v": params["attn_dropout_v"]}
    heads = set()
    for name in CROSSMODAL_NAMES + MEMORY_NAMES:
        encoder = child(mult, name, source, where)
        memory = name in MEMORY_NAMES
        expected = {"attn_dropout": params["attn_dropout"] if memory else by_source[name[-1]],
                    "dropout": params["embed_dropout"], "attn_mask": params["attn_mask"]}
        blocks = child(encoder, "layers", source, name).state["_modules"]
        depth = max(layers, 3) if memory else layers
        if len(blocks) != depth:
            raise CheckpointError(f"{source}: the published {name} has {len(blocks)} layers where its MULTModel's "
                                  f"layers={layers} gives {depth}")
        checks = [(name, encoder, expected)]
        for index, block in blocks.items():
            checks.append((f"{name}.layers.{index}", block, {"relu_dropout": params["relu_dropout"],
                                                             "res_dropout": params["res_dropout"]}))
            attention = child(block, "self_attn", source, f"{name}.layers.{index}")
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
    out_weight = child(mult, "out_layer", source, where).state["_parameters"].get("weight")
    if out_weight is None or out_weight.dim() != 2:
        raise CheckpointError(f"{source}: the published MULTModel's out_layer has no (C, 6·d) weight")
    return params, dims, int(out_weight.shape[0])
