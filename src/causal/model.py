"""CausalMER: any backbone (the multimodal path z_m) plus three unimodal branches, joined by the causal head.

The wrapper is model-agnostic: it only relies on the backbone contract (src/models/contract.py) and on
branches mapping one modality (B, L_m, d_m) to logits (B, C). It declares what the loop needs to know
(docs/design.md § The model contract): its main prediction (`tie`), its parameter groups (backbone, each
branch, each constant: each gets its own Adam learning rate) and its counterfactual constants.

Its validation loss is the causal loss plus the backbone's auxiliary loss where the backbone counts it
in validation (contract.py): around MulT and PMR that is the training loss; around DMD it is the causal
loss alone, since DMD declares its auxiliary terms (distillation, reconstruction) training signals, not
a measure of its prediction. So CausalMER selects on its own objective whichever backbone it wraps.
"""
import torch
import torch.nn as nn

from .head import CausalHead
from .loss import causal_loss_terms, check_kl
from ..modalities import LETTERS, MODALITIES
from ..models.contract import split_backbone_output, with_aux_term


class CausalMER(nn.Module):
    main_prediction = "tie"  # the debiased prediction, logits_tie

    def __init__(
        self,
        backbone: nn.Module,
        text_branch: nn.Module,
        audio_branch: nn.Module,
        vision_branch: nn.Module,
        head: CausalHead,
        alpha: float = 0.1,
        beta: float = 1.0,
        kl: str = "all",
        unimodal_labels: bool = False,
    ):
        super().__init__()
        self.backbone = backbone
        self.text_branch = text_branch
        self.audio_branch = audio_branch
        self.vision_branch = vision_branch
        self.head = head
        self.alpha = alpha
        self.beta = beta
        self.kl = check_kl(kl)
        # loss.unimodal_labels: each branch learns from its own modality's label (CH-SIMS).
        self.unimodal_labels = unimodal_labels

    def forward(self, text: torch.Tensor, audio: torch.Tensor, vision: torch.Tensor) -> dict:
        logits_m, extras = split_backbone_output(self.backbone(text, audio, vision))
        # Each branch sees only its own modality: that is what makes its logits a shortcut to remove.
        out = self.head(logits_m, self.text_branch(text), self.audio_branch(audio), self.vision_branch(vision))
        out["extras"] = extras
        return out

    def parameter_groups(self) -> list[tuple[str, str, list]]:
        """(group name, its train.lr key, its parameters): the backbone, each branch, each constant."""
        branches = {"text": self.text_branch, "audio": self.audio_branch, "vision": self.vision_branch}
        return ([("backbone", "backbone", list(self.backbone.parameters()))]
                + [(m, m, list(branches[m].parameters())) for m in MODALITIES]
                + [(f"constant_{letter}", "constant", [parameter]) for letter, parameter in self.constants().items()])

    def constants(self) -> dict[str, nn.Parameter]:
        """The head's counterfactual constants by modality letter: {"t": c_t, "a": c_a, "v": c_v}."""
        return {letter: getattr(self.head, f"constant_{letter}") for letter in LETTERS.values()}

    def loss_terms(self, out: dict, target: torch.Tensor, unimodal_targets: dict | None = None) -> dict:
        """The weighted parts of the loss by name (task_te, task_text, task_audio, task_vision, kl, and
        aux when the backbone has an auxiliary loss); `loss` is their sum. With `unimodal_labels`, the
        branches' terms use `unimodal_targets` (the batch's label_t, label_a, label_v)."""
        terms = causal_loss_terms(out, target, alpha=self.alpha, beta=self.beta, kl=self.kl,
                                  unimodal_targets=unimodal_targets if self.unimodal_labels else None)
        return with_aux_term(terms, self.backbone, out["extras"], target)

    def loss(self, out: dict, target: torch.Tensor) -> torch.Tensor:
        return sum(self.loss_terms(out, target).values())

    def validation_loss(self, out: dict, target: torch.Tensor) -> torch.Tensor:
        """The causal loss, plus the backbone's auxiliary loss where the backbone counts it (contract.py)."""
        terms = with_aux_term(self.causal_terms(out, target), self.backbone, out["extras"], target, validation=True)
        return sum(terms.values())

    def causal_terms(self, out: dict, target: torch.Tensor) -> dict:
        return causal_loss_terms(out, target, alpha=self.alpha, beta=self.beta, kl=self.kl)
