"""BackboneOnly: a backbone trained on its own, the baseline CausalMER is compared against.

It speaks the same interface as CausalMER (forward -> dict, loss(out, target), loss_terms(out, target),
validation_loss(out, target), main_prediction, parameter_groups(), constants()) so both train and
evaluate with the same loop (docs/design.md § The model contract); its prediction is `logits_m`.
"""
import torch
import torch.nn as nn

from ..losses import task_loss
from .contract import split_backbone_output, with_aux_term


class BackboneOnly(nn.Module):
    main_prediction = "m"  # the backbone's own logits_m

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, text: torch.Tensor, audio: torch.Tensor, vision: torch.Tensor) -> dict:
        logits_m, extras = split_backbone_output(self.backbone(text, audio, vision))
        return {"logits_m": logits_m, "extras": extras}

    def parameter_groups(self) -> list[tuple[str, str, list]]:
        """(group name, its train.lr key, its parameters): one group, the backbone."""
        return [("backbone", "backbone", list(self.backbone.parameters()))]

    def constants(self) -> dict:
        """No causal head, no counterfactual constants."""
        return {}

    def loss_terms(self, out: dict, target: torch.Tensor, unimodal_targets: dict | None = None) -> dict:
        """The parts of the loss by name (task_m, and aux when the backbone has one); `loss` is their sum.
        `unimodal_targets` is accepted for the loop's sake: the backbone alone has no branch to train with it."""
        return with_aux_term({"task_m": task_loss(out["logits_m"], target)}, self.backbone, out["extras"], target)

    def loss(self, out: dict, target: torch.Tensor) -> torch.Tensor:
        return sum(self.loss_terms(out, target).values())

    def validation_loss(self, out: dict, target: torch.Tensor) -> torch.Tensor:
        """The task loss of `logits_m`, plus the auxiliary loss where the backbone counts it (contract.py)."""
        terms = with_aux_term({"task_m": task_loss(out["logits_m"], target)}, self.backbone, out["extras"], target,
                              validation=True)
        return sum(terms.values())
