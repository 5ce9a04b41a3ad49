"""Random missing modalities: which modalities each sample keeps, and its inputs with the others zeroed.

The protocol of the missing-modality literature (GCNet): per sample and per modality, a modality is
dropped with probability η, and a sample that would lose all three keeps one of them, drawn uniformly.
LNLN's training variant draws η per sample, r ~ U(0, 1), for half of the samples and leaves the other
half complete. A dropped modality is zeroed, as `--remove` zeroes a whole modality for every sample.

Masks are (N, 3) booleans in MODALITIES order, True where the modality is kept; they are drawn from a
numpy Generator the caller seeds, so a draw is reproducible from its seed.
"""
from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from ..modalities import MODALITIES


def check_rate(rate: float, where: str) -> float:
    """A missing rate is a probability below 1: at rate 1 no sample would keep a modality of its own."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise UserError(f"{where} must be a rate in [0, 1) (the probability that a modality is missing), "
                        f"got {rate!r}")
    return float(rate)


def _at_least_one(keep: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Give every sample that lost all modalities back one of them, drawn uniformly."""
    empty = ~keep.any(axis=1)
    chosen = rng.integers(0, keep.shape[1], size=keep.shape[0])  # drawn for all rows: a fixed stream
    keep[empty, chosen[empty]] = True
    return keep


def keep_masks(n: int, rate: float, rng: np.random.Generator) -> np.ndarray:
    """GCNet's masks: each modality of each sample dropped with probability `rate`, at least one kept."""
    keep = rng.random((n, len(MODALITIES))) >= rate
    return _at_least_one(keep, rng)


def uniform_keep_masks(n: int, high: float, rng: np.random.Generator) -> np.ndarray:
    """LNLN's training masks: half of the samples complete, the others dropping each modality with their
    own rate r ~ U(0, high) (LNLN: high → 1); at least one kept."""
    rates = high * rng.random(n) * (rng.random(n) >= 0.5)  # rate 0 (complete) for about half of the samples
    keep = rng.random((n, len(MODALITIES))) >= rates[:, None]
    return _at_least_one(keep, rng)


def zero_missing(inputs: list, keep: torch.Tensor) -> list:
    """`inputs` (text, audio, vision), each (B, L, d), with the modalities `keep` (B, 3) marks False
    replaced by zeros, sample by sample (torch.where: exactly what zeros_like gives `--remove`)."""
    return [torch.where(keep[:, i].reshape(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype,
                                                                                         device=x.device))
            for i, x in enumerate(inputs)]
