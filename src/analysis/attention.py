"""Crossmodal attention maps of MulT (and of DMD's heterogeneous branch, which is MulT's encoders).

For each of the six crossmodal encoders (target <- source: `trans_l_with_a` is text attending to
audio), the last layer's attention weights, averaged over heads and over a split's samples (or for
one sample): a (query steps x key steps) map per encoder whose rows sum to 1 and whose masked
entries (the shifted future mask) are 0. `attention_maps` aggregates, `write_attention_npz` and
`src.analysis.plots.plot_attention_grid` write them.

Everything model-specific is in `crossmodal_attention`: it reads the weights out of the model and is
the one function to change when the encoders' storage changes.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from src.atomic import replacing
from src.errors import UserError

CROSSMODAL_NAMES = ("trans_l_with_a", "trans_l_with_v", "trans_a_with_l",
                    "trans_a_with_v", "trans_v_with_l", "trans_v_with_a")
_LETTER_NAMES = {"l": "text", "a": "audio", "v": "vision"}
LABELS = {name: f"{_LETTER_NAMES[name[6]]} <- {_LETTER_NAMES[name[-1]]}" for name in CROSSMODAL_NAMES}


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    model = model.module if hasattr(model, "module") else model
    return getattr(model, "backbone", model)


def has_crossmodal_attention(model: torch.nn.Module) -> bool:
    """Whether the model's backbone holds MulT's six crossmodal encoders (MulT, DMD; not PMR)."""
    stack = getattr(_backbone(model), "crossmodal", None)
    return stack is not None and tuple(getattr(stack, "names", ())) == CROSSMODAL_NAMES


@torch.no_grad()
def crossmodal_attention(model: torch.nn.Module, text, audio, vision) -> dict:
    """{encoder name: last-layer attention weights (B, H, T_q, T_k)} for one batch, in eval mode.

    Today the six encoders are one `EncoderStack` (`backbone.crossmodal`): a forward hook records the
    sequences the backbone feeds it, and each encoder's last-layer attention is recomputed on a
    standalone copy of that member (`member(name)`), layer by layer, exactly as its forward runs.
    """
    backbone = _backbone(model)
    if not has_crossmodal_attention(model):
        raise UserError(f"the {type(backbone).__name__} backbone has no MulT crossmodal encoders; attention maps "
                        "are for the mult and dmd backbones")
    stack = backbone.crossmodal
    seen = {}

    def record(module, args, kwargs):
        seen["queries"], seen["keys"] = args[0], args[1] if len(args) > 1 else kwargs.get("keys")

    was_training = model.training
    model.eval()
    handle = stack.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model(text, audio, vision)
    finally:
        handle.remove()
        model.train(was_training)
    weights = {}
    for name, query, key in zip(stack.names, seen["queries"], seen["keys"]):
        weights[name] = last_layer_attention(stack.member(name).eval(), query, key)
    return weights


def last_layer_attention(encoder, x_in, x_in_k) -> torch.Tensor:
    """(B, H, T_q, T_k) attention probabilities of a `TransformerEncoder`'s last layer, in eval mode,
    for query input (T_q, B, E) and key/value input (T_k, B, E)."""
    from src.models.encoder import future_mask

    x, x_k = encoder._embed(x_in), encoder._embed(x_in_k)
    mask = future_mask(x.shape[0], x_k.shape[0], x.device, x.dtype) if encoder.attn_mask else None
    for layer in encoder.layers[:-1]:
        x = layer(x, x_k, x_k, mask=mask)
    layer = encoder.layers[-1]
    norm, attention = layer.layer_norms[0], layer.self_attn
    embed_dim, heads = attention.embed_dim, attention.num_heads
    weight, bias = attention.in_proj_weight, attention.in_proj_bias
    q = torch.nn.functional.linear(norm(x), weight[:embed_dim], bias[:embed_dim])
    k = torch.nn.functional.linear(norm(x_k), weight[embed_dim:2 * embed_dim], bias[embed_dim:2 * embed_dim])
    q, k = attention._split_heads(q), attention._split_heads(k)  # (B, H, T, head_dim)
    scores = q @ k.transpose(-1, -2) * attention.head_dim ** -0.5
    if mask is not None:
        scores = scores + mask
    return torch.softmax(scores, dim=-1)


def aggregate(weights: torch.Tensor, sample: int | None = None) -> np.ndarray:
    """(B, H, T_q, T_k) -> the mean over heads and over the B samples, or for sample `sample`: (T_q, T_k)."""
    weights = weights.double()
    if sample is not None:
        weights = weights[sample:sample + 1]
    return weights.mean(dim=1).mean(dim=0).cpu().numpy()


def attention_maps(model, dataset, batch_size: int, device, sample: int | None = None) -> dict:
    """{encoder name: (T_q, T_k)} averaged over heads and every sample of `dataset`, or for sample `sample`."""
    if sample is not None:
        if not 0 <= sample < len(dataset):
            raise UserError(f"--sample {sample} is outside the split, which has samples 0..{len(dataset) - 1}")
        indices = [[sample]]
    else:
        order = np.arange(len(dataset))
        indices = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    sums, count = {}, 0
    for chunk in indices:
        batch = dataset.get_batch(chunk)
        inputs = [batch[m].to(device) for m in ("text", "audio", "vision")]
        for name, weights in crossmodal_attention(model, *inputs).items():
            # Sum over samples here, divide once at the end: the mean over the whole split.
            total = weights.double().mean(dim=1).sum(dim=0)
            sums[name] = total if name not in sums else sums[name] + total
        count += len(chunk)
    return {name: (total / count).cpu().numpy() for name, total in sums.items()}


def write_attention_npz(maps: dict, path) -> Path:
    """One float array per encoder name in an .npz, through the atomic writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{name: np.asarray(weights, dtype=np.float64) for name, weights in maps.items()})
    return path
