"""The MulT transformer encoder (docs/design.md § MulT): pre-LayerNorm layers, sinusoidal positions, shifted
future mask.

This file is the one definition of the encoder's math, written to be read: every layer is
`x + dropout(attention(LN0(x), LN0(k), LN0(v)))` then `x + dropout(fc2(dropout(relu(fc1(LN1(x))))))`,
attention is `F.scaled_dot_product_attention`, dropout is `F.dropout`. It runs as written on every
device. The faster execution of groups of these encoders (src/models/engine.py) reads their
parameters and must compute what this file computes.

Tensors are sequence-first (T, B, E) as in the reference, so reference state_dicts load unchanged.
"""
import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

# Buffers the reference encoder stores that carry no weights; dropped when loading its state_dicts.
_WEIGHTLESS_REFERENCE_BUFFERS = ("version", "embed_positions._float_tensor")


@lru_cache(maxsize=64)
def _position_table(length: int, embed_dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Rows 1..length of the fairseq sinusoidal table, shape (length, embed_dim).

    Built in float32 exactly as the reference builds it (then cast), so fixtures match to 1e-6.
    Row p is [sin(p·f_i), cos(p·f_i)] with f_i = exp(-i·ln(10000)/(E/2 - 1)); an odd width gets a
    zero last column. Cached: it depends only on the shape, the device and the dtype.
    """
    with torch.inference_mode(False):  # a cached tensor must stay usable by autograd later
        return _build_position_table(length, embed_dim).to(device=device, dtype=dtype)


def _build_position_table(length: int, embed_dim: int) -> torch.Tensor:
    half_dim = embed_dim // 2
    step = math.log(10000) / (half_dim - 1)
    frequencies = torch.exp(torch.arange(half_dim, dtype=torch.float32) * -step)
    angles = torch.arange(1, length + 1, dtype=torch.float32).unsqueeze(1) * frequencies.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if embed_dim % 2 == 1:
        table = torch.cat([table, torch.zeros(length, 1)], dim=1)
    return table


def sinusoidal_positions(x: torch.Tensor, time_dim: int = 0) -> torch.Tensor:
    """Position embeddings for an input whose time axis is `time_dim` and feature axis the last
    ((T, B, E) by default), with the reference's zero-as-padding rule.

    Time step t (1-based) gets the embedding of position t, except that a step whose channel-0 value
    is exactly 0 counts as padding and gets a zero vector. Positions are *not* renumbered around
    padded steps (the reference's `make_positions` without left padding keeps t). This is why a
    zeroed modality carries no position signal at all.
    """
    length, embed_dim = x.shape[time_dim], x.shape[-1]
    shape = [1] * x.dim()
    shape[time_dim], shape[-1] = length, embed_dim
    table = _position_table(length, embed_dim, x.device, x.dtype).view(shape)
    not_padding = (x[..., :1] != 0).to(x.dtype)
    return table * not_padding


def embed_input(x: torch.Tensor, dropout_p: float, training: bool, time_dim: int = 0, dropout=F.dropout):
    """The encoder's input stage: √E·x + positions(x), then `dropout` (`F.dropout`, or a function
    with its signature). Time axis `time_dim`, features last: (T, B, E) by default."""
    x = math.sqrt(x.shape[-1]) * x + sinusoidal_positions(x, time_dim)
    return dropout(x, p=dropout_p, training=training)


@lru_cache(maxsize=64)
def future_mask(t_q: int, t_k: int, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive attention mask (t_q, t_k): -inf where j > i + |t_k - t_q|, else 0.

    The reference's future mask, shifted by the length difference so that crossmodal attention
    between sequences of different lengths still lets every query see at least the first key.
    Cached: it depends only on the shapes, the device and the dtype. Callers must not modify it.
    """
    with torch.inference_mode(False):  # a cached tensor must stay usable by autograd later
        shift = abs(t_k - t_q)
        rows = torch.arange(t_q, device=device).unsqueeze(1)
        cols = torch.arange(t_k, device=device).unsqueeze(0)
        blocked = cols > rows + shift
        mask = torch.zeros(t_q, t_k, device=device, dtype=dtype)
        return mask.masked_fill(blocked, float("-inf"))


class MultiheadAttention(nn.Module):
    """Multi-head attention with the reference's packed in-projection (3E, E) + bias.

    `forward(query, key, value, attn_mask=None, need_weights=False)` on (T, B, E) tensors returns
    (T_q, B, E): softmax(q·kᵀ/√head_dim + mask) with dropout `attn_dropout` on the weights (in
    training), times v, through `F.scaled_dot_product_attention`. With `need_weights=True` it returns
    `(output, weights)`, the weights (B, H, T_q, T_k) computed explicitly in float32 before dropout:
    each row sums to 1 and masked entries are exactly 0.
    """

    def __init__(self, embed_dim: int, num_heads: int, attn_dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ConfigError(f"an attention width of {embed_dim} is not a multiple of its {num_heads} heads "
                              "(d_model must be a multiple of num_heads)")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.attn_dropout = attn_dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.constant_(self.in_proj_bias, 0.0)
        nn.init.xavier_uniform_(self.out_proj.weight)
        nn.init.constant_(self.out_proj.bias, 0.0)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        # (T, B, E) -> (B, H, T, head_dim), the layout SDPA expects
        length, batch, _ = x.shape
        return x.view(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(self, query, key, value, attn_mask=None, need_weights: bool = False):
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self._split_heads(F.linear(query, w_q, b_q))
        k = self._split_heads(F.linear(key, w_k, b_k))
        v = self._split_heads(F.linear(value, w_v, b_v))
        if attn_mask is not None:
            attn_mask = attn_mask.to(q.dtype)
        dropout_p = self.attn_dropout if self.training else 0.0
        if need_weights:
            scores = (q @ k.transpose(-2, -1)).float() * self.head_dim ** -0.5
            if attn_mask is not None:
                scores = scores + attn_mask.float()
            weights = torch.softmax(scores, dim=-1)
            attended = F.dropout(weights, p=dropout_p, training=self.training).to(v.dtype) @ v
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        t_q, batch = query.shape[0], query.shape[1]
        output = self.out_proj(attended.permute(2, 0, 1, 3).reshape(t_q, batch, self.embed_dim))
        return (output, weights) if need_weights else output


class TransformerEncoderLayer(nn.Module):
    """One pre-LayerNorm layer. Crossmodal key/value go through the *same* LN0 as the query."""

    def __init__(self, embed_dim, num_heads, attn_dropout=0.0, relu_dropout=0.0, res_dropout=0.0):
        super().__init__()
        self.self_attn = MultiheadAttention(embed_dim, num_heads, attn_dropout)
        self.relu_dropout = relu_dropout
        self.res_dropout = res_dropout
        self.fc1 = nn.Linear(embed_dim, 4 * embed_dim)
        self.fc2 = nn.Linear(4 * embed_dim, embed_dim)
        self.layer_norms = nn.ModuleList([nn.LayerNorm(embed_dim) for _ in range(2)])
        for fc in (self.fc1, self.fc2):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.constant_(fc.bias, 0.0)

    def forward(self, x, x_k=None, x_v=None, mask=None):
        """x (T_q, B, E); x_k/x_v (T_k, B, E) for crossmodal attention; mask additive (T_q, T_k)."""
        norm = self.layer_norms[0]
        q = norm(x)
        k = q if x_k is None else norm(x_k)
        v = q if x_v is None else norm(x_v)
        attended = self.self_attn(q, k, v, attn_mask=mask)
        x = x + F.dropout(attended, p=self.res_dropout, training=self.training)

        hidden = F.relu(self.fc1(self.layer_norms[1](x)))
        hidden = F.dropout(hidden, p=self.relu_dropout, training=self.training)
        return x + F.dropout(self.fc2(hidden), p=self.res_dropout, training=self.training)


class TransformerEncoder(nn.Module):
    """A stack of `layers` pre-LN layers plus a final LayerNorm (docs/design.md § MulT).

    `forward(x, x_k=None, x_v=None, last_step=False)` on (T, B, E); giving x_k (and x_v, which
    defaults to x_k) makes every layer attend from x to that key/value sequence, embedded once:
    crossmodal attention. `last_step` returns only the output's last time step, (B, E).
    """

    def __init__(self, embed_dim, num_heads, layers, attn_dropout=0.0, relu_dropout=0.0,
                 res_dropout=0.0, embed_dropout=0.0, attn_mask=False):
        super().__init__()
        self.embed_dropout = embed_dropout
        self.attn_mask = attn_mask
        self.layers = nn.ModuleList([
            TransformerEncoderLayer(embed_dim, num_heads, attn_dropout=attn_dropout,
                                    relu_dropout=relu_dropout, res_dropout=res_dropout)
            for _ in range(layers)
        ])
        self.layer_norm = nn.LayerNorm(embed_dim)

    def forward(self, x_in, x_in_k=None, x_in_v=None, last_step: bool = False):
        """(T, B, E) -> (T, B, E); with `last_step`, (B, E)."""
        x = embed_input(x_in, self.embed_dropout, self.training)
        x_k = x_v = None
        if x_in_k is not None:
            # As in the reference, key and value are embedded separately (under embedding dropout
            # they get independent masks) even when they are the same input.
            x_k = embed_input(x_in_k, self.embed_dropout, self.training)
            x_v = embed_input(x_in_k if x_in_v is None else x_in_v, self.embed_dropout, self.training)
        mask = None
        if self.attn_mask:
            t_k = x.shape[0] if x_k is None else x_k.shape[0]
            mask = future_mask(x.shape[0], t_k, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, x_k, x_v, mask=mask)
        x = self.layer_norm(x)
        return x[-1] if last_step else x

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The reference keeps a version counter and a dtype-tracking dummy for its position table;
        # neither holds weights, so they are dropped here and strict loading still checks every
        # real parameter.
        for name in _WEIGHTLESS_REFERENCE_BUFFERS:
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
