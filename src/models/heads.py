"""The residual head MulT, PMR and DMD end with (docs/design.md § MulT, item 6)."""
import torch
import torch.nn.functional as F
from torch import nn


def residual_head(x: torch.Tensor, proj1: nn.Linear, proj2: nn.Linear, out_layer: nn.Linear, dropout_p: float,
                  training: bool):
    """hidden = proj2(dropout(relu(proj1(x)))) + x; returns (out_layer(hidden), hidden).

    A function of the three Linear layers, so that MulT and PMR keep them as their own attributes
    under the reference's names (`proj1`, `proj2`, `out_layer`).
    """
    hidden = proj2(F.dropout(F.relu(proj1(x)), p=dropout_p, training=training)) + x
    return out_layer(hidden), hidden


class ResidualHead(nn.Module):
    """`residual_head` with its own width-preserving layers: forward(x) -> (logits, hidden)."""

    def __init__(self, width: int, output_dim: int, out_dropout: float):
        super().__init__()
        self.proj1 = nn.Linear(width, width)
        self.proj2 = nn.Linear(width, width)
        self.out_layer = nn.Linear(width, output_dim)
        self.out_dropout = out_dropout

    def forward(self, x: torch.Tensor):
        return residual_head(x, self.proj1, self.proj2, self.out_layer, self.out_dropout, self.training)
