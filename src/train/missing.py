"""Training with missing modalities (train.missing_rate, train.missing_schedule); off at rate 0.

Each epoch, every training sample loses modalities (zeroed inputs, at least one kept; src/eval/missing.py):
- `fixed` (GCNet): each modality with probability missing_rate;
- `uniform` (LNLN): half of the samples complete, the others with their own rate r ~ U(0, missing_rate).
The masks of an epoch are a pure function of (seed, epoch), like its shuffle, so a resumed run redraws
exactly the masks the interrupted one would have used, and they do not depend on the number of ranks.
"""
from __future__ import annotations

import numpy as np
import torch

from ..eval.missing import keep_masks, uniform_keep_masks, zero_missing
from ..modalities import MODALITIES
from ..run.config import check_setting

# A third seed word: the masks' stream never coincides with the shuffle's (epoch_order uses [seed, epoch]).
MASK_STREAM = 1


def check_missing(tcfg: dict) -> None:
    """Refuse a rate outside [0, 1) or an unknown schedule, naming the key (the schema's rows)."""
    for key in ("missing_rate", "missing_schedule"):
        check_setting(f"train.{key}", tcfg[key])


def epoch_keep_masks(n: int, tcfg: dict, seed: int, epoch: int) -> np.ndarray | None:
    """(n, 3) keep masks of one epoch over the training split's rows, or None when nothing is dropped."""
    rate = tcfg["missing_rate"]
    if not rate:
        return None
    rng = np.random.default_rng([seed, epoch, MASK_STREAM])
    if tcfg["missing_schedule"] == "uniform":
        return uniform_keep_masks(n, rate, rng)
    return keep_masks(n, rate, rng)


def drop_modalities(batch: dict, keep: np.ndarray) -> dict:
    """The batch with each sample's modalities that `keep` (B, 3) marks False zeroed."""
    device = batch[MODALITIES[0]].device
    zeroed = zero_missing([batch[m] for m in MODALITIES], torch.as_tensor(keep, device=device))
    return {**batch, **dict(zip(MODALITIES, zeroed))}
