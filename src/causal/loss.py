"""The CausalMER training objective (docs/design.md § The training objective).

    L = α · [ℓ(logits_te) + ℓ(z_t) + ℓ(z_a) + ℓ(z_v)] + β · L_KL

    L_KL = H(te, nde) + [H(nde_t, nde_a) + H(nde_a, nde_v) + H(nde_v, nde_t)] / 3
           + H(te, nde_t) + H(te, nde_a) + H(te, nde_v)

H(x, y) = mean over the batch of Σ −softmax(x) · log_softmax(y). Neither side is detached: the head has
already cut the backbone and branches out of te and nde_*, so L_KL trains the three constants only, and
it does so through both arguments. The task terms train the backbone and branches only.

Softmax modes (`kl`):
- "all" (default, the reference's behaviour): one softmax over the whole last dimension — for IEMOCAP's
  8 logits that mixes the four (absent, present) pairs into one distribution.
- "pair": for K binary tasks (integer (B, K) target, 2K logits), one softmax per (absent, present) pair;
  H is the sum over the pair's two entries, averaged over the K tasks (the same reduction as ℓ). For
  other targets there are no pairs and it is the same as "all".

With one output (regression) every softmax is 1 and L_KL ≡ 0, so the constants get zero gradient and the
head cannot debias: training should say so once (see `warn_if_constants_cannot_learn`).
"""
import logging

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..losses import target_kind, task_loss
from ..modalities import LABEL_KEYS

KL_MODES = ("all", "pair")

DEGENERATE_KL_MESSAGE = (
    "the causal head has a single output (regression): every softmax in its KL term is 1, so the KL "
    "term is always 0 and the counterfactual constants cannot learn; the head will not debias. "
    "Use task 'cls' (7 classes) to train the causal head."
)


def check_kl(name: str) -> str:
    """Return name if it is a known KL softmax mode, else raise ConfigError listing the valid ones."""
    if name not in KL_MODES:
        raise ConfigError(f"unknown kl mode '{name}'; valid modes: {', '.join(KL_MODES)}")
    return name


def kl_is_degenerate(output_dim: int) -> bool:
    """True when the KL term is identically zero, i.e. the constants cannot learn."""
    return output_dim == 1


def warn_if_constants_cannot_learn(output_dim: int, logger: logging.Logger | None = None) -> bool:
    """Log DEGENERATE_KL_MESSAGE as a warning when output_dim makes L_KL ≡ 0; return whether it did."""
    if not kl_is_degenerate(output_dim):
        return False
    (logger or logging.getLogger(__name__)).warning(DEGENERATE_KL_MESSAGE)
    return True


def cross_entropy_of_softmaxes(p_logits: torch.Tensor, q_logits: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """H(softmax(p_logits), softmax(q_logits)), summed over classes and averaged over batch and groups.

    groups = K splits the last dimension into K consecutive softmaxes (the per-pair mode).
    """
    batch = p_logits.shape[0]
    p_logits = p_logits.reshape(batch, groups, -1)
    q_logits = q_logits.reshape(batch, groups, -1)
    per_group = -(F.softmax(p_logits, dim=-1) * F.log_softmax(q_logits, dim=-1)).sum(dim=-1)
    return per_group.mean()


def kl_term(out: dict, groups: int = 1) -> torch.Tensor:
    """L_KL: the debiased effects agree with the total effect, and the direct effects with each other."""
    def h(p, q):
        return cross_entropy_of_softmaxes(out[p], out[q], groups)

    between_modalities = (h("nde_t", "nde_a") + h("nde_a", "nde_v") + h("nde_v", "nde_t")) / 3
    return h("te", "nde") + between_modalities + h("te", "nde_t") + h("te", "nde_a") + h("te", "nde_v")


# The weighted parts of L by name: the fused prediction's task loss, each branch's, and the KL term.
TASK_TERMS = {"task_te": "logits_te", "task_text": "logits_t", "task_audio": "logits_a", "task_vision": "logits_v"}
# A batch's per-modality targets (data files with a label per modality, CH-SIMS), by the branch term they train.
UNIMODAL_TARGETS = {f"task_{modality}": key for modality, key in LABEL_KEYS.items()}


def causal_loss_terms(out: dict, target: torch.Tensor, alpha: float = 0.1, beta: float = 1.0,
                      kl: str = "all", unimodal_targets: dict | None = None) -> dict:
    """The parts of the training loss, weighted, by name: their sum is `causal_loss`.

    `unimodal_targets` ({"label_t": ..., "label_a": ..., "label_v": ...}, loss.unimodal_labels): each
    branch's task loss is taken against its own modality's target instead of the sample's."""
    check_kl(kl)
    targets = {name: (unimodal_targets or {}).get(UNIMODAL_TARGETS.get(name), target) for name in TASK_TERMS}
    terms = {name: alpha * task_loss(out[key], targets[name]) for name, key in TASK_TERMS.items()}
    groups = 1
    if kl == "pair" and target_kind(out["te"], target) == "binary":
        groups = target.shape[1]
    terms["kl"] = beta * kl_term(out, groups)
    return terms


def causal_loss(out: dict, target: torch.Tensor, alpha: float = 0.1, beta: float = 1.0, kl: str = "all") -> torch.Tensor:
    """The scalar training loss for a CausalHead output dict and its target."""
    return sum(causal_loss_terms(out, target, alpha=alpha, beta=beta, kl=kl).values())
