"""CausalMER: a counterfactual causal head over any backbone plus three unimodal branches."""
from .head import FUSIONS, CausalHead, check_fusion
from .loss import (
    DEGENERATE_KL_MESSAGE,
    KL_MODES,
    causal_loss,
    causal_loss_terms,
    check_kl,
    kl_is_degenerate,
    warn_if_constants_cannot_learn,
)
from .model import CausalMER

__all__ = [
    "CausalHead",
    "CausalMER",
    "FUSIONS",
    "KL_MODES",
    "DEGENERATE_KL_MESSAGE",
    "causal_loss",
    "causal_loss_terms",
    "check_fusion",
    "check_kl",
    "kl_is_degenerate",
    "warn_if_constants_cannot_learn",
]
