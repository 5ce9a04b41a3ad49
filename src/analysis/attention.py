"""Crossmodal attention maps of MulT (and of DMD's heterogeneous branch, which is MulT's encoders).

For each of the six crossmodal encoders (target <- source: `trans_l_with_a` is text attending to
audio), the last layer's attention weights, averaged over heads and over a split's samples (or for
one sample): a (query steps x key steps) map per encoder. Padded steps (the data's zero left-padding)
are left out: a cell is the mean over the samples in which both its query and its key step are real,
and nan where no sample has both, so that a map shows where attention goes among real steps, not how
much of it lands in the padding. `attention_maps` aggregates, `write_attention_npz` and
`src.analysis.plots.plot_attention_grid` write them.

Everything model-specific is in `crossmodal_attention`: it reads the weights out of the model's
plain encoder modules (`MultiheadAttention(..., need_weights=True)`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..atomic import replacing
from ..errors import UserError
from ..eval.evaluate import unwrap
from ..models.encoder import TransformerEncoder
from ..models.mult import CROSSMODAL_NAMES

_LETTER_NAMES = {"l": "text", "a": "audio", "v": "vision"}
# Each encoder's (query, key) modality: `trans_l_with_a` is text (query) attending to audio (key).
SIDES = {name: (_LETTER_NAMES[name[6]], _LETTER_NAMES[name[-1]]) for name in CROSSMODAL_NAMES}
LABELS = {name: f"{_LETTER_NAMES[name[6]]} <- {_LETTER_NAMES[name[-1]]}" for name in CROSSMODAL_NAMES}


def _backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The backbone of a wrapper (CausalMER, BackboneOnly, either under DDP), or a backbone given alone."""
    model = unwrap(model)
    return getattr(model, "backbone", model)


def has_crossmodal_attention(model: torch.nn.Module) -> bool:
    """Whether the model's backbone holds MulT's six crossmodal encoders (MulT, DMD; not PMR)."""
    backbone = _backbone(model)
    return all(isinstance(getattr(backbone, name, None), TransformerEncoder) for name in CROSSMODAL_NAMES)


@torch.no_grad()
def crossmodal_attention(model: torch.nn.Module, text, audio, vision) -> dict:
    """{encoder name: last-layer attention weights (B, H, T_q, T_k)} for one batch, in eval mode.

    The model runs once with the plain engine, so that every encoder runs its own modules; a forward
    hook on each crossmodal encoder's last attention asks that module, on the very inputs it was given,
    for its weights (`need_weights=True`, through `forward` so that the hook does not call itself).
    """
    backbone = _backbone(model)
    if not has_crossmodal_attention(model):
        raise UserError(f"the {type(backbone).__name__} backbone has no MulT crossmodal encoders; attention maps "
                        "are for the mult and dmd backbones")
    weights = {}

    def keep_weights(name):
        def hook(module, args, kwargs, output):
            _, weights[name] = module.forward(*args, **{**kwargs, "need_weights": True})
        return hook

    handles = [getattr(backbone, name).layers[-1].self_attn.register_forward_hook(keep_weights(name), with_kwargs=True)
               for name in CROSSMODAL_NAMES]
    was_training, engine = model.training, backbone.engine
    model.eval()
    backbone.engine = "plain"
    try:
        model(text, audio, vision)
    finally:
        for handle in handles:
            handle.remove()
        backbone.engine = engine
        model.train(was_training)
    return {name: weights[name] for name in CROSSMODAL_NAMES}


def aggregate(weights: torch.Tensor, sample: int | None = None) -> np.ndarray:
    """(B, H, T_q, T_k) -> the mean over heads and over the B samples, or for sample `sample`: (T_q, T_k)."""
    weights = weights.double()
    if sample is not None:
        weights = weights[sample:sample + 1]
    return weights.mean(dim=1).mean(dim=0).cpu().numpy()


def real_steps(features: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) bool: which of an encoder's `steps` time steps see real input, from the modality's
    features (B, L, D). A step is padding when its feature vector is all zero; the temporal convolution
    (kernel L - steps + 1, no padding) makes encoder step t see input steps t .. t + kernel - 1, and the
    step is real when any of those is."""
    real = (features != 0).any(dim=-1).double()                                # (B, L)
    kernel = features.shape[1] - steps + 1
    if kernel < 1:
        raise ValueError(f"{steps} encoder steps from {features.shape[1]} input steps")
    windows = torch.nn.functional.max_pool1d(real[:, None], kernel_size=kernel, stride=1)[:, 0]
    return windows > 0


def attention_maps(model, dataset, batch_size: int, device, sample: int | None = None) -> dict:
    """{encoder name: (T_q, T_k)} averaged over heads and every sample of `dataset` (or for sample
    `sample`), padded steps left out (see the module docstring; nan where no sample has both steps)."""
    if sample is not None:
        if not 0 <= sample < len(dataset):
            raise UserError(f"--sample {sample} is outside the split, which has samples 0..{len(dataset) - 1}")
        indices = [[sample]]
    else:
        order = np.arange(len(dataset))
        indices = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    sums, counts = {}, {}
    for chunk in indices:
        batch = dataset.get_batch(chunk)
        inputs = {m: batch[m].to(device) for m in ("text", "audio", "vision")}
        for name, weights in crossmodal_attention(model, *inputs.values()).items():
            query, key = SIDES[name]
            steps_q, steps_k = weights.shape[-2:]
            real = (real_steps(inputs[query], steps_q)[:, :, None] & real_steps(inputs[key], steps_k)[:, None, :]).double()
            # Sum over samples here, divide once at the end: the mean over the whole split.
            total, count = (weights.double().mean(dim=1) * real).sum(dim=0), real.sum(dim=0)
            sums[name] = total if name not in sums else sums[name] + total
            counts[name] = count if name not in counts else counts[name] + count
    return {name: torch.where(counts[name] > 0, total / counts[name].clamp(min=1), torch.nan).cpu().numpy()
            for name, total in sums.items()}


def write_attention_npz(maps: dict, path) -> Path:
    """One float array per encoder name in an .npz, through the atomic writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **{name: np.asarray(weights, dtype=np.float64) for name, weights in maps.items()})
    return path
