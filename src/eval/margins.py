"""Decision margins of the causal head: how much of each direct effect can change a decision.

A constant added to every logit of one decision (e.g. the class-independent Y_0 term) moves |NDE_m|
but never a decision; only the spread of the logits within the decision does. A decision is one
(absent, present) pair per emotion on IEMOCAP (task ``binary``) and the 7 classes on MOSEI/MOSI
``cls``; a pair's spread is |present − absent|. Regression has a single output and no decision
between logits, so it has no margins.
"""
from __future__ import annotations

import numpy as np

from ..modalities import LETTERS, MODALITIES

# Model outputs the margins read (keys of a CausalHead output, as `predict` returns them).
MARGIN_KEYS = ("nde_t", "nde_a", "nde_v", "logits_te", "logits_tie")


def _decisions(logits, task: str) -> np.ndarray:
    """(N, C) logits -> (N, D, K): D decisions of K logits each."""
    logits = np.asarray(logits, dtype=np.float64)
    if task == "binary":
        return logits.reshape(len(logits), -1, 2)
    return logits.reshape(len(logits), 1, -1)


def spread(logits, task: str) -> np.ndarray:
    """Per sample and decision, the largest minus the smallest logit: (N, D)."""
    decisions = _decisions(logits, task)
    return decisions.max(axis=-1) - decisions.min(axis=-1)


def decision_margins(out: dict, task: str) -> dict | None:
    """Mean spread of the total effect TE and of each NDE_m, and how often the
    debiased prediction decides differently from the fused one; None for regression or without the
    causal head's outputs in `out` (see MARGIN_KEYS)."""
    if task.endswith("regression") or any(key not in out for key in MARGIN_KEYS):
        return None
    result = {m: float(spread(out[f"nde_{LETTERS[m]}"], task).mean()) for m in MODALITIES}
    # TE = Y_all − Y_0 and Y_0 is the same for every class, so TE's spread is that of logits_te.
    result["te"] = float(spread(out["logits_te"], task).mean())
    tie, te = _decisions(out["logits_tie"], task), _decisions(out["logits_te"], task)
    result["tie_te_flip_rate"] = float(np.mean(tie.argmax(-1) != te.argmax(-1)))
    return result
