"""The MulT transformer encoder: pre-LayerNorm layers, sinusoidal positions, shifted future mask.

Numerically it is the reference encoder (SPEC §2); structurally it is rebuilt for speed and memory:

- attention runs through `F.scaled_dot_product_attention`, which picks a fused kernel when it can
  (no (B, H, T_q, T_k) weight tensor is kept for backward on the fused paths);
- the position table and the attention mask depend only on shapes, so they are built once per
  (length, width, device, dtype) and cached across calls; per forward only the data-dependent
  "channel 0 is exactly zero" padding rule is applied, as one multiply (no host-device sync);
- crossmodal key and value are one tensor in every MulT use, so they are normalised and projected
  once per layer instead of twice;
- on CPU, dropout draws 16 random bits per element from 64-bit words instead of calling
  `bernoulli_` (which dominated a training step), and attention with dropout — which SDPA can only
  run on its unfused math path, keeping several (B, H, T_q, T_k) tensors for backward — runs
  through a chunked function that keeps only the random bits of its dropout mask and recomputes the softmax in
  backward.

Tensors are sequence-first (T, B, E) as in the reference, so reference state_dicts load unchanged.
"""
import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

# Buffers the reference encoder stores that carry no weights; dropped when loading its state_dicts.
_WEIGHTLESS_REFERENCE_BUFFERS = ("version", "embed_positions._float_tensor")


@lru_cache(maxsize=64)
def _position_table(length: int, embed_dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Rows 1..length of the fairseq sinusoidal table, shape (length, embed_dim).

    Built in float32 exactly as the reference builds it (then cast), so fixtures match to 1e-6.
    Row p is [sin(p·f_i), cos(p·f_i)] with f_i = exp(-i·ln(10000)/(E/2 - 1)); an odd width gets a
    zero last column.
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


def sinusoidal_positions(x: torch.Tensor) -> torch.Tensor:
    """Position embeddings for a (T, B, E) input, with the reference's zero-as-padding rule.

    Time step t (1-based) gets the embedding of position t, except that a step whose channel-0 value
    is exactly 0 counts as padding and gets a zero vector. Positions are *not* renumbered around
    padded steps (the reference's `make_positions` without left padding keeps t). This is why a
    zeroed modality carries no position signal at all.
    """
    length, _, embed_dim = x.shape
    table = _position_table(length, embed_dim, x.device, x.dtype)  # (T, E)
    not_padding = (x[:, :, 0] != 0).unsqueeze(-1).to(x.dtype)  # (T, B, 1)
    return table.unsqueeze(1) * not_padding


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


# --- dropout ----------------------------------------------------------------------------------

def _random_lanes(shape, device) -> torch.Tensor:
    """Uniform random int16 values of the given shape.

    CPU random generation costs per draw, so each 64-bit draw is split into four 16-bit lanes.
    """
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    return words.view(torch.int16)[:numel].view(shape)


def _keep_scale(lanes: torch.Tensor, p) -> torch.Tensor:
    """float32 dropout multiplier from random lanes: 0 with probability p (rounded to 2^-16), else 1/(1-p).

    Computed with float arithmetic rather than a boolean compare: for integer lanes,
    clamp(lane - threshold + 1, 0, 1) is exactly 1 when lane >= threshold and 0 otherwise, and
    vectorised float ops are several times faster on CPU than boolean masks.
    """
    if isinstance(p, torch.Tensor):  # one probability per leading row, shaped to broadcast
        threshold = torch.round(p * 65536) - 32768
        return lanes.to(torch.float32).sub_(threshold - 1).clamp_(0.0, 1.0).mul_(1.0 / (1.0 - p))
    threshold = -32768 + round(p * 65536)
    keep = lanes.to(torch.float32).sub_(threshold - 1).clamp_(0.0, 1.0)
    return keep.mul_(1.0 / (1.0 - p))


class _Dropout(torch.autograd.Function):
    """x times the dropout multiplier; saves only the int16 lanes (2 bytes per element)."""

    @staticmethod
    def forward(ctx, x, lanes, p):
        ctx.save_for_backward(lanes)
        ctx.p = p
        return x * _keep_scale(lanes, p).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (lanes,) = ctx.saved_tensors
        return grad * _keep_scale(lanes, ctx.p).to(grad.dtype), None, None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Same distribution as `F.dropout` (up to p's rounding to 2^-16 on CPU), faster on CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p=p, training=True)
    return _Dropout.apply(x, _random_lanes(x.shape, x.device), p)


# --- attention with dropout on CPU ----------------------------------------------------------------

# Elements of one (B·H, rows, T_k) score block; bounds the temporary memory of the chunked attention.
_SCORE_BLOCK_ELEMENTS = 1 << 22


def _query_chunks(batch_heads: int, t_q: int, t_k: int):
    rows = max(1, _SCORE_BLOCK_ELEMENTS // max(1, batch_heads * t_k))
    return [(start, min(start + rows, t_q)) for start in range(0, t_q, rows)]


def _attention_probs(q_scaled, k, mask):
    """softmax(q_scaled @ k^T + mask) in float32 for one chunk of queries."""
    if mask is None:
        scores = torch.bmm(q_scaled, k.transpose(1, 2))
    else:
        scores = torch.baddbmm(mask, q_scaled, k.transpose(1, 2))
    return torch.softmax(scores.float(), dim=-1)


def _mask_rows(mask, start, stop):
    """Query rows of a (T_q, T_k) mask shared by all batch rows, or of an (N, T_q, T_k) one."""
    if mask is None:
        return None
    return mask[start:stop] if mask.dim() == 2 else mask[:, start:stop]


class _DropoutAttention(torch.autograd.Function):
    """softmax(q k^T · scale + mask) with dropout on the weights, times v; (N, T, d) tensors.

    `p` is one dropout probability, or an (N, 1, 1) tensor of them (one per batch row: grouped
    encoders with different attention dropouts); `mask` is (T_q, T_k) or (N, T_q, T_k).

    Small problems keep the probabilities and the dropout multiplier for backward. Large ones save
    only q, k, v, the output and the int16 random lanes of the dropout mask; the softmax is then
    recomputed chunk by chunk in backward, so no float (N, T_q, T_k) tensor outlives a chunk.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, p, scale):
        batch_heads, t_q, _ = q.shape
        t_k = k.shape[1]
        lanes = _random_lanes((batch_heads, t_q, t_k), q.device)
        q_scaled = q * scale
        if batch_heads * t_q * t_k <= _SCORE_BLOCK_ELEMENTS:
            # Small enough to keep: backward then needn't recompute scores and softmax.
            probs = _attention_probs(q_scaled, k, mask)
            keep = _keep_scale(lanes, p)
            out = torch.bmm((probs * keep).to(v.dtype), v)
            ctx.save_for_backward(q, k, v, out, probs, keep)
            ctx.scale, ctx.kept_probs = scale, True
            return out
        out = torch.empty_like(q)
        for start, stop in _query_chunks(batch_heads, t_q, t_k):
            probs = _attention_probs(q_scaled[:, start:stop], k, _mask_rows(mask, start, stop))
            probs.mul_(_keep_scale(lanes[:, start:stop], p))
            out[:, start:stop] = torch.bmm(probs.to(v.dtype), v)
        ctx.save_for_backward(q, k, v, out, lanes, mask)
        ctx.scale, ctx.p, ctx.kept_probs = scale, p, False
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, *rest = ctx.saved_tensors
        batch_heads, t_q, _ = q.shape
        t_k = k.shape[1]
        grad_out = grad_out.contiguous()
        # Row sums of dP ∘ P equal those of dO ∘ O: the usual softmax-backward shortcut.
        row_dot = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        if ctx.kept_probs:
            chunks, (saved_probs, saved_keep) = [(0, t_q)], rest
        else:
            chunks, (lanes, mask) = _query_chunks(batch_heads, t_q, t_k), rest
            q_scaled = q * ctx.scale
        scale = ctx.scale
        for start, stop in chunks:
            rows = slice(start, stop)
            if ctx.kept_probs:
                probs, keep = saved_probs, saved_keep
            else:
                probs = _attention_probs(q_scaled[:, rows], k, _mask_rows(mask, start, stop))
                keep = _keep_scale(lanes[:, rows], ctx.p)
            grad_v += torch.bmm((probs * keep).to(v.dtype).transpose(1, 2), grad_out[:, rows]).float()
            grad_scores = torch.bmm(grad_out[:, rows], v.transpose(1, 2)).float()
            grad_scores.mul_(keep).sub_(row_dot[:, rows]).mul_(probs)
            grad_scores = grad_scores.to(q.dtype)
            grad_q[:, rows] = torch.bmm(grad_scores, k).mul_(scale)
            grad_k += torch.bmm(grad_scores.transpose(1, 2), q[:, rows]).float().mul_(scale)
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


class MultiheadAttention(nn.Module):
    """Multi-head attention with the reference's packed in-projection (3E, E) + bias.

    `forward(query, key, value, attn_mask=None)` on (T, B, E) tensors returns (T_q, B, E). Scaling is
    1/sqrt(head_dim) (SDPA's default); attention dropout is applied to the weights inside SDPA.
    """

    def __init__(self, embed_dim: int, num_heads: int, attn_dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
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
        # (T, B, E) -> (B, H, T, head_dim): the layout SDPA expects; a view plus one permute.
        length, batch, _ = x.shape
        return x.view(length, batch, self.num_heads, self.head_dim).permute(1, 2, 0, 3)

    def forward(self, query, key, value, attn_mask=None):
        embed_dim = self.embed_dim
        weight, bias = self.in_proj_weight, self.in_proj_bias
        if query is key and key is value:
            q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
        elif key is value:
            q = F.linear(query, weight[:embed_dim], bias[:embed_dim])
            k, v = F.linear(key, weight[embed_dim:], bias[embed_dim:]).chunk(2, dim=-1)
        else:
            q = F.linear(query, weight[:embed_dim], bias[:embed_dim])
            k = F.linear(key, weight[embed_dim:2 * embed_dim], bias[embed_dim:2 * embed_dim])
            v = F.linear(value, weight[2 * embed_dim:], bias[2 * embed_dim:])
        if attn_mask is not None and attn_mask.dtype != q.dtype:
            attn_mask = attn_mask.to(q.dtype)  # both attention paths want the query's dtype
        q, k, v = self._split_heads(q), self._split_heads(k), self._split_heads(v)
        batch, heads, t_q, head_dim = q.shape
        dropout_p = self.attn_dropout if self.training else 0.0
        if dropout_p > 0.0 and q.device.type == "cpu":
            attended = _DropoutAttention.apply(
                q.reshape(batch * heads, t_q, head_dim), k.reshape(batch * heads, -1, head_dim),
                v.reshape(batch * heads, -1, head_dim), attn_mask, dropout_p, head_dim ** -0.5,
            ).view(batch, heads, t_q, head_dim)
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        attended = attended.permute(2, 0, 1, 3).reshape(t_q, batch, embed_dim)
        return self.out_proj(attended)


class TransformerEncoderLayer(nn.Module):
    """One pre-LayerNorm layer. Crossmodal key/value go through the *same* LN0 as the query."""

    def __init__(self, embed_dim, num_heads, attn_dropout=0.0, relu_dropout=0.0, res_dropout=0.0,
                 attn_mask=False):
        super().__init__()
        self.self_attn = MultiheadAttention(embed_dim, num_heads, attn_dropout)
        self.attn_mask = attn_mask
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
        if x_k is None:
            k = v = q
        else:
            k = norm(x_k)
            v = k if x_v is x_k else norm(x_v)
        attended = self.self_attn(q, k, v, attn_mask=mask)
        x = x + dropout(attended, self.res_dropout, self.training)

        hidden = F.relu(self.fc1(self.layer_norms[1](x)))
        hidden = dropout(hidden, self.relu_dropout, self.training)
        return x + dropout(self.fc2(hidden), self.res_dropout, self.training)


class TransformerEncoder(nn.Module):
    """A stack of `layers` pre-LN layers plus a final LayerNorm (SPEC §2).

    `forward(x, x_k=None, x_v=None)` on (T, B, E); giving x_k/x_v makes every layer attend from x to
    that (fixed, embedded once) key/value sequence: crossmodal attention.
    """

    def __init__(self, embed_dim, num_heads, layers, attn_dropout=0.0, relu_dropout=0.0,
                 res_dropout=0.0, embed_dropout=0.0, attn_mask=False):
        super().__init__()
        self.embed_dim = embed_dim
        self.embed_scale = math.sqrt(embed_dim)
        self.embed_dropout = embed_dropout
        self.attn_mask = attn_mask
        self.layers = nn.ModuleList([
            TransformerEncoderLayer(embed_dim, num_heads, attn_dropout=attn_dropout,
                                    relu_dropout=relu_dropout, res_dropout=res_dropout, attn_mask=attn_mask)
            for _ in range(layers)
        ])
        self.layer_norm = nn.LayerNorm(embed_dim)

    def _embed(self, x_in):
        x = self.embed_scale * x_in + sinusoidal_positions(x_in)
        return dropout(x, self.embed_dropout, self.training)

    def forward(self, x_in, x_in_k=None, x_in_v=None):
        x = self._embed(x_in)
        x_k = x_v = None
        if x_in_k is not None:
            x_k = self._embed(x_in_k)
            # Key and value are the same input in every MulT use. The reference embeds them
            # separately, so under embedding dropout they get independent masks and must stay two
            # tensors; otherwise they are equal, and one tensor lets each layer normalise and
            # project it once.
            same_input = x_in_v is None or x_in_v is x_in_k
            if same_input and not (self.training and self.embed_dropout > 0):
                x_v = x_k
            else:
                x_v = self._embed(x_in_k if x_in_v is None else x_in_v)
        mask = None
        if self.attn_mask:
            t_k = x.shape[0] if x_k is None else x_k.shape[0]
            mask = future_mask(x.shape[0], t_k, x.device, x.dtype)
        for layer in self.layers:
            x = layer(x, x_k, x_v, mask=mask)
        return self.layer_norm(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The reference keeps a version counter and a dtype-tracking dummy for its position table;
        # neither holds weights, so they are dropped here and strict loading still checks every
        # real parameter.
        for name in _WEIGHTLESS_REFERENCE_BUFFERS:
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# --- several encoders of one shape run as one batched computation --------------------------------

@lru_cache(maxsize=32)
def _grouped_mask(query_lengths, key_lengths, batch, heads, attn_mask, device, dtype):
    """(G·B·H, T, S) additive mask for grouped encoders padded to T = max T_g, S = max S_g.

    Encoder g's padded keys (j >= S_g) are blocked for every query, and with `attn_mask` its own
    shifted future mask (j > i + |S_g - T_g|) applies. Every row keeps key 0, so none is empty.
    """
    with torch.inference_mode(False):
        t_max, s_max = max(query_lengths), max(key_lengths)
        rows = torch.arange(t_max, device=device).view(1, t_max, 1)
        cols = torch.arange(s_max, device=device).view(1, 1, s_max)
        t_real = torch.tensor(query_lengths, device=device).view(-1, 1, 1)
        s_real = torch.tensor(key_lengths, device=device).view(-1, 1, 1)
        blocked = cols >= s_real
        if attn_mask:
            blocked = blocked | (cols > rows + (s_real - t_real).abs())
        mask = torch.zeros(blocked.shape, device=device, dtype=dtype).masked_fill(blocked, float("-inf"))
        groups = len(query_lengths)
        return mask.unsqueeze(1).expand(groups, batch * heads, t_max, s_max).reshape(-1, t_max, s_max)


def _pad_and_stack(sequences, length):
    """List of (T_g, B, E) -> (G, B, length, E): batch-first, zero-padded at the end of time.

    Batch-first lets the attention heads be split and merged as views (no copies) around SDPA.
    """
    return torch.stack([F.pad(x.transpose(0, 1), (0, 0, 0, length - x.shape[0])) for x in sequences])


def _grouped_layer_norm(x, norms):
    weight = torch.stack([norm.weight for norm in norms]).view(len(norms), 1, 1, -1)
    bias = torch.stack([norm.bias for norm in norms]).view(len(norms), 1, 1, -1)
    return torch.addcmul(bias, F.layer_norm(x, x.shape[-1:], eps=norms[0].eps), weight)


def _grouped_linear(x, weights, biases):
    """x (G, B, T, in) through G different Linear maps: one batched matmul."""
    weight = torch.stack(weights).transpose(1, 2)  # (G, in, out)
    bias = torch.stack(biases).unsqueeze(1)  # (G, 1, out)
    out = torch.baddbmm(bias, x.reshape(x.shape[0], -1, x.shape[-1]), weight)
    return out.view(*x.shape[:-1], -1)


def can_group(encoders, query_lengths, key_lengths, max_padding=0.25) -> bool:
    """Whether running `encoders` as one batch is exact and not wasteful.

    Exact when they share width, heads, depth, mask flag and the per-token dropouts (attention
    dropout may differ); worthwhile when padding every sequence to the longest adds at most
    `max_padding` to the attention and feed-forward work.
    """
    first = encoders[0]
    same_shape = all(
        e.embed_dim == first.embed_dim and len(e.layers) == len(first.layers) and e.attn_mask == first.attn_mask
        and e.embed_dropout == first.embed_dropout
        and e.layers[0].self_attn.num_heads == first.layers[0].self_attn.num_heads
        and e.layers[0].relu_dropout == first.layers[0].relu_dropout
        and e.layers[0].res_dropout == first.layers[0].res_dropout
        for e in encoders
    )
    t_max, s_max = max(query_lengths), max(key_lengths)
    real = sum(t * s + t for t, s in zip(query_lengths, key_lengths))
    padded = len(encoders) * (t_max * s_max + t_max)
    return same_shape and padded <= (1 + max_padding) * real


def run_grouped(encoders, queries, keys=None):
    """Equivalent to `[enc(x, k, k) for enc, x, k in zip(encoders, queries, keys)]` (or self-attention
    when `keys` is None), computed as one batch over the encoders.

    Small sequences leave a CPU step dominated by per-operation overhead, not arithmetic; stacking
    G encoders' weights and padding their sequences to a common length turns G·(ops per layer) into
    ops per layer. Padded keys are masked out and padded query rows dropped at the end, so every
    real output equals the encoder's own (eval mode: to float rounding; training: the same
    distribution). Check `can_group` first.
    """
    groups = len(encoders)
    first = encoders[0]
    training = first.training
    attn_ps = [enc.layers[0].self_attn.attn_dropout for enc in encoders]
    if training and len(set(attn_ps)) > 1 and queries[0].device.type != "cpu":
        # SDPA takes one dropout probability; only the CPU path below handles one per encoder
        return [enc(q, k, k) if keys is not None else enc(q)
                for enc, q, k in zip(encoders, queries, keys or queries)]
    crossmodal = keys is not None
    query_lengths = tuple(x.shape[0] for x in queries)
    key_lengths = tuple(k.shape[0] for k in keys) if crossmodal else query_lengths
    t_max, s_max = max(query_lengths), max(key_lengths)
    batch, embed_dim = queries[0].shape[1], first.embed_dim
    heads = first.layers[0].self_attn.num_heads
    head_dim = embed_dim // heads

    x = _pad_and_stack([enc._embed(q) for enc, q in zip(encoders, queries)], t_max)
    kv = None
    if crossmodal:
        kv = _pad_and_stack([enc._embed(k) for enc, k in zip(encoders, keys)], s_max)
        # the reference embeds key and value separately: under embedding dropout they differ
        separate_value = training and first.embed_dropout > 0
        value = _pad_and_stack([enc._embed(k) for enc, k in zip(encoders, keys)], s_max) if separate_value else kv

    mask = _grouped_mask(query_lengths, key_lengths, batch, heads, first.attn_mask, x.device, x.dtype)
    use_dropout_attention = training and max(attn_ps) > 0 and x.device.type == "cpu"
    if use_dropout_attention:
        per_row_p = torch.tensor(attn_ps, dtype=torch.float32, device=x.device)
        per_row_p = per_row_p.repeat_interleave(batch * heads).view(-1, 1, 1)

    def split_heads(t):  # (G, B, L, E) -> (G·B, H, L, head_dim), a view
        return t.view(groups * batch, t.shape[2], heads, head_dim).transpose(1, 2)

    for depth in range(len(first.layers)):
        layers = [enc.layers[depth] for enc in encoders]
        attns = [layer.self_attn for layer in layers]
        norms0 = [layer.layer_norms[0] for layer in layers]
        q_in = _grouped_layer_norm(x, norms0)
        if crossmodal:
            k_in = _grouped_layer_norm(kv, norms0)
            v_in = k_in if value is kv else _grouped_layer_norm(value, norms0)
            q = _grouped_linear(q_in, [a.in_proj_weight[:embed_dim] for a in attns],
                                [a.in_proj_bias[:embed_dim] for a in attns])
            if v_in is k_in:
                k, v = _grouped_linear(k_in, [a.in_proj_weight[embed_dim:] for a in attns],
                                       [a.in_proj_bias[embed_dim:] for a in attns]).chunk(2, dim=-1)
            else:
                k = _grouped_linear(k_in, [a.in_proj_weight[embed_dim:2 * embed_dim] for a in attns],
                                    [a.in_proj_bias[embed_dim:2 * embed_dim] for a in attns])
                v = _grouped_linear(v_in, [a.in_proj_weight[2 * embed_dim:] for a in attns],
                                    [a.in_proj_bias[2 * embed_dim:] for a in attns])
        else:
            q, k, v = _grouped_linear(q_in, [a.in_proj_weight for a in attns],
                                      [a.in_proj_bias for a in attns]).chunk(3, dim=-1)
        q, k, v = split_heads(q), split_heads(k), split_heads(v)
        layer_mask = mask.to(q.dtype)
        if use_dropout_attention:
            attended = _DropoutAttention.apply(
                q.reshape(-1, t_max, head_dim), k.reshape(-1, s_max, head_dim), v.reshape(-1, s_max, head_dim),
                layer_mask, per_row_p, head_dim ** -0.5,
            ).view(groups * batch, heads, t_max, head_dim)
        else:
            attended = F.scaled_dot_product_attention(
                q, k, v, attn_mask=layer_mask.view(groups * batch, heads, t_max, s_max),
                dropout_p=attn_ps[0] if training else 0.0,  # equal across the group here
            )
        attended = attended.transpose(1, 2).reshape(groups, batch, t_max, embed_dim)
        attended = _grouped_linear(attended, [a.out_proj.weight for a in attns], [a.out_proj.bias for a in attns])
        x = x + dropout(attended, first.layers[0].res_dropout, training)

        hidden = _grouped_layer_norm(x, [layer.layer_norms[1] for layer in layers])
        hidden = F.relu(_grouped_linear(hidden, [layer.fc1.weight for layer in layers],
                                        [layer.fc1.bias for layer in layers]))
        hidden = dropout(hidden, first.layers[0].relu_dropout, training)
        hidden = _grouped_linear(hidden, [layer.fc2.weight for layer in layers], [layer.fc2.bias for layer in layers])
        x = x + dropout(hidden, first.layers[0].res_dropout, training)

    x = _grouped_layer_norm(x, [enc.layer_norm for enc in encoders])
    return [x[g, :, :length].transpose(0, 1) for g, length in enumerate(query_lengths)]


def run_encoders(encoders, queries, keys=None, group: bool = True):
    """Apply each encoder to its query (and key/value) sequence.

    With similar lengths (aligned data) the encoders run as one batched computation, which on
    small inputs is several times fewer operations; with very different lengths (unaligned data)
    padding would cost more than it saves, so each runs on its own.
    """
    query_lengths = [q.shape[0] for q in queries]
    key_lengths = query_lengths if keys is None else [k.shape[0] for k in keys]
    if group and can_group(encoders, query_lengths, key_lengths):
        return run_grouped(encoders, queries, keys)
    if keys is None:
        return [encoder(q) for encoder, q in zip(encoders, queries)]
    return [encoder(q, k, k) for encoder, q, k in zip(encoders, queries, keys)]
