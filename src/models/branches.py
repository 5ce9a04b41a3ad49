"""Unimodal branches: each maps one modality's raw features (B, L, d) to logits (B, C)
(docs/design.md § Unimodal branches).

A branch sees only its own modality, so what it learns is that modality's shortcut to the label; the
causal head subtracts exactly that. Kinds (built by name through `src.models.build_branch`):

- `pool`: masked mean over the non-padded time steps, then a small MLP. Cheapest; ignores order.
- `transformer`: a small self-attention encoder (the MulT encoder) over the modality, then masked
  mean pooling (or the last step). Sees order and context at a fraction of the backbone's cost.
- `resnet18`: the reference audio/vision branch, a randomly initialised ResNet-18 over the (L × d)
  feature matrix as a one-channel image. Heavy on long unaligned sequences.
- `albert` (src/models/albert.py): the reference text branch; needs the optional `transformers`.

Padding: the MulT pickles pad on the left with all-zero steps, so a step counts as padding when every
feature is exactly 0.
"""
import torch
from torch import nn

from .encoder import TransformerEncoder


def padding_mask(x: torch.Tensor) -> torch.Tensor:
    """(B, L, d) -> (B, L) bool, True at real (not all-zero) time steps."""
    return (x != 0).any(dim=-1)


def masked_mean(x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Mean of x (B, L, E) over the steps where real (B, L) is True; all-padding rows give 0."""
    weights = real.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


class PoolBranch(nn.Module):
    """Masked mean over time, LayerNorm, then Linear -> ReLU -> Dropout -> Linear.

    The LayerNorm puts modalities with very different feature scales (GloVe, COVAREP, FACET) on one
    footing so that one learning rate suits all three branches.
    """

    def __init__(self, in_dim, seq_len=None, output_dim=1, hidden=64, dropout=0.1):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, output_dim),
        )

    def forward(self, x):
        return self.mlp(self.norm(masked_mean(x, padding_mask(x))))


class TransformerBranch(nn.Module):
    """Linear projection (no bias) -> MulT self-attention encoder -> pooling -> Linear.

    The projection has no bias so that padded (all-zero) steps stay exactly zero and, by the
    encoder's channel-0 rule, get no position embedding either. `pooling` is "mean" (masked mean
    over real steps) or "last" (the last step, as MulT reads its memory encoders).
    """

    def __init__(self, in_dim, seq_len=None, output_dim=1, d_model=32, num_heads=4, layers=1,
                 dropout=0.1, attn_mask=False, pooling="mean"):
        super().__init__()
        if pooling not in ("mean", "last"):
            raise ValueError(f"pooling must be 'mean' or 'last', not {pooling!r}")
        self.pooling = pooling
        self.proj = nn.Linear(in_dim, d_model, bias=False)
        self.encoder = TransformerEncoder(d_model, num_heads, layers, attn_dropout=dropout,
                                          relu_dropout=dropout, res_dropout=dropout,
                                          embed_dropout=dropout, attn_mask=attn_mask)
        self.out = nn.Linear(d_model, output_dim)

    def forward(self, x):
        hidden = self.encoder(self.proj(x).transpose(0, 1)).transpose(0, 1)  # (B, L, d_model)
        pooled = hidden[:, -1] if self.pooling == "last" else masked_mean(hidden, padding_mask(x))
        return self.out(pooled)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and an identity (or 1x1-projected) shortcut."""

    def __init__(self, in_channels, out_channels, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels),
            )

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class ResNet18Branch(nn.Module):
    """ResNet-18 over the (L × d) feature matrix as a one-channel image, randomly initialised.

    conv 7x7/2 -> max-pool 3x3/2 -> four stages of two BasicBlocks (width, 2·, 4·, 8·width channels;
    strides 1, 2, 2, 2) -> global average pool -> Linear to C. `width` 64 is the standard network.
    """

    def __init__(self, in_dim, seq_len=None, output_dim=1, width=64):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        stages, channels = [], width
        for stage, stride in enumerate((1, 2, 2, 2)):
            out_channels = width * 2 ** stage
            stages += [BasicBlock(channels, out_channels, stride), BasicBlock(out_channels, out_channels)]
            channels = out_channels
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, output_dim)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        features = self.stages(self.stem(x.unsqueeze(1)))  # (B, 1, L, d) image in
        return self.fc(self.pool(features).flatten(1))
