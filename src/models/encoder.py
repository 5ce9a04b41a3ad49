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
  `bernoulli_` (which dominated a training step); a residual connection adds its dropped-out branch
  in one multiply-add; and attention in training — which SDPA can only run with dropout on its
  unfused math path, keeping several (B, H, T_q, T_k) tensors for backward — runs through a function
  with a hand-written backward that, for long sequences, keeps only the random bits of its dropout
  mask and recomputes the softmax chunk by chunk;
- when only the last time step is read (`last_step`), the last layer computes only that query row.

Groups of same-shaped encoders (MulT's six crossmodal ones, its three memory ones) are held and run
as one stacked computation by `src/models/encoder_stack.py`, built on the pieces here.

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
    Under torch.compile the lanes are drawn directly (the same distribution): the compiler cannot
    return a view that reinterprets int64 storage as int16.
    """
    if torch.compiler.is_compiling():
        return torch.randint(-2 ** 15, 2 ** 15, tuple(shape), dtype=torch.int16, device=device)
    numel = math.prod(shape)
    words = torch.empty((numel + 3) // 4, dtype=torch.int64, device=device).random_(-2 ** 63, None)
    return words.view(torch.int16)[:numel].view(shape)


def _keep_mask(lanes: torch.Tensor, p: float) -> torch.Tensor:
    """float32 0/1 mask from random lanes: 0 with probability p (rounded to 2^-16), else 1.

    Computed with float arithmetic rather than a boolean compare: for integer lanes,
    clamp(lane - threshold + 1, 0, 1) is exactly 1 when lane >= threshold and 0 otherwise, and
    vectorised float ops are several times faster on CPU than boolean masks.
    """
    threshold = -32768 + round(p * 65536)
    return lanes.to(torch.float32).sub_(threshold - 1).clamp_(0.0, 1.0)


def _keep_scale(lanes: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout multiplier: `_keep_mask` times 1/(1-p)."""
    return _keep_mask(lanes, p).mul_(1.0 / (1.0 - p))


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


# Up to this many elements, dropout is a plain multiply whose float multiplier autograd keeps for
# backward (4 bytes per element, one multiply in backward, no Python in the backward pass); larger
# tensors keep only the int16 lanes (2 bytes) and recompute the multiplier in backward.
_KEEP_MULTIPLIER_ELEMENTS = 1 << 20


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Same distribution as `F.dropout` (up to p's rounding to 2^-16 on CPU), faster on CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return F.dropout(x, p=p, training=True)
    lanes = _random_lanes(x.shape, x.device)
    if x.numel() <= _KEEP_MULTIPLIER_ELEMENTS:
        return x * _keep_scale(lanes, p).to(x.dtype)
    return _Dropout.apply(x, lanes, p)


def add_dropout(x: torch.Tensor, branch: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`x + dropout(branch)`, a residual connection; on a CPU one multiply-add instead of two passes."""
    if not training or p == 0.0:
        return x + branch
    if branch.device.type != "cpu" or p >= 1.0 or branch.numel() > _KEEP_MULTIPLIER_ELEMENTS:
        return x + dropout(branch, p, training)
    keep = _keep_mask(_random_lanes(branch.shape, branch.device), p).to(branch.dtype)
    return torch.addcmul(x, branch, keep, value=1.0 / (1.0 - p))


def _dropout_rescale(p: float, training: bool) -> float:
    """The 1/(1-p) by which dropout scales what it keeps (1 when nothing is kept or dropped)."""
    return 1.0 / (1.0 - p) if training and 0.0 < p < 1.0 else 1.0


class _ReluKeep(torch.autograd.Function):
    """relu(x) ∘ keep, keep a 0/1 mask: saves only its output, which the next Linear keeps anyway.

    Where the output is positive, x was positive and kept, so the gradient passes exactly there.
    """

    @staticmethod
    def forward(ctx, x, keep):
        out = torch.relu(x).mul_(keep)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, grad):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, out, 0.0), None


def relu_dropout_unscaled(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """`dropout(relu(x))` without the rescale: the caller multiplies the next Linear's weight by
    `_dropout_rescale(p, training)` instead, (h∘s)·W = h·(s·W), which touches the small weight and
    not the large hidden activations. In training this keeps one activation tensor for backward
    where relu plus dropout keep three.
    """
    if not training or p == 0.0:
        return F.relu(x)
    if x.device.type == "cpu":
        keep = _keep_mask(_random_lanes(x.shape, x.device), p).to(x.dtype)
    else:
        keep = torch.empty_like(x).bernoulli_(1.0 - min(p, 1.0))
    return _ReluKeep.apply(x, keep)


# --- attention with dropout on CPU ----------------------------------------------------------------

# Elements of one (B·H, rows, T_k) score block; bounds the temporary memory of the chunked attention.
_SCORE_BLOCK_ELEMENTS = 1 << 22


def _query_chunks(batch_heads: int, t_q: int, t_k: int):
    rows = max(1, _SCORE_BLOCK_ELEMENTS // max(1, batch_heads * t_k))
    return [(start, min(start + rows, t_q)) for start in range(0, t_q, rows)]


def _attention_probs(q, k, mask, scale):
    """softmax(q @ k^T · scale + mask) in float32 for one chunk of queries."""
    if mask is None:
        scores = torch.bmm(q, k.transpose(1, 2)).mul_(scale)
    else:
        scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=scale)
    return torch.softmax(scores.float(), dim=-1)


def _mask_rows(mask, start, stop):
    """Query rows of a (T_q, T_k) mask shared by all batch rows, or of an (N, T_q, T_k) one."""
    if mask is None:
        return None
    return mask[start:stop] if mask.dim() == 2 else mask[:, start:stop]


def _dropout_runs(p, rows: int):
    """A dropout probability for all `rows` rows, or ((p, start, stop), ...) row runs -> the runs with p > 0."""
    if isinstance(p, (int, float)):
        return ((float(p), 0, rows),) if p > 0 else ()
    return tuple((float(q), start, stop) for q, start, stop in p if q > 0)


def _drop_runs(weights, runs, keeps, in_place=False):
    """`weights` (N, T, S) with each run's rows times its dropout multiplier; other rows unchanged."""
    if not runs:
        return weights
    if not in_place:
        if len(runs) == 1 and runs[0][1] == 0 and runs[0][2] == weights.shape[0]:
            return weights * keeps[0]
        weights = weights.clone()
    for (_, start, stop), keep in zip(runs, keeps):
        weights[start:stop].mul_(keep)
    return weights


class _DropoutAttention(torch.autograd.Function):
    """softmax(q k^T · scale + mask) with dropout on the weights, times v; (N, T, d) tensors.

    `mask` is (T_q, T_k) or (N, T_q, T_k). `p` is one dropout probability for every row, or
    ((p, start, stop), ...) giving runs of rows their own (encoders of a stack differ in attention
    dropout); rows outside every run, or with p = 0, are plain attention (on a CPU this function with
    its hand-written backward trains faster than SDPA for MulT's small heads). Random lanes are drawn
    per run, in order, only for runs that drop.

    Small problems keep the probabilities (and the dropped-out weights) for backward. Large ones
    save only q, k, v, the output and the int16 random lanes of the dropout masks; the softmax is
    then recomputed chunk by chunk in backward, so no float (N, T_q, T_k) tensor outlives a chunk.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, p, scale):
        batch_heads, t_q, _ = q.shape
        t_k = k.shape[1]
        runs = _dropout_runs(p, batch_heads)
        lanes = [_random_lanes((stop - start, t_q, t_k), q.device) for _, start, stop in runs]
        ctx.scale, ctx.runs = scale, runs
        ctx.kept_probs = batch_heads * t_q * t_k <= _SCORE_BLOCK_ELEMENTS
        if ctx.kept_probs:
            # Small enough to keep: backward then needn't recompute scores and softmax.
            probs = _attention_probs(q, k, mask, scale)
            keeps = [_keep_scale(run_lanes, run[0]) for run_lanes, run in zip(lanes, runs)]
            dropped = _drop_runs(probs, runs, keeps)  # probs itself when nothing drops
            out = _times_values(dropped.to(v.dtype), v)
            ctx.save_for_backward(q, k, v, out, probs, dropped, *keeps)
            return out
        out = torch.empty_like(q)
        for start, stop in _query_chunks(batch_heads, t_q, t_k):
            probs = _attention_probs(q[:, start:stop], k, _mask_rows(mask, start, stop), scale)
            keeps = [_keep_scale(run_lanes[:, start:stop], run[0]) for run_lanes, run in zip(lanes, runs)]
            out[:, start:stop] = _times_values(_drop_runs(probs, runs, keeps, in_place=True).to(v.dtype), v)
        ctx.save_for_backward(q, k, v, out, mask, *lanes)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, *rest = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        runs = ctx.runs
        # Row sums of dP ∘ P equal those of dO ∘ O: the usual softmax-backward shortcut.
        row_dot = (grad_out.float() * out.float()).sum(-1, keepdim=True)
        if ctx.kept_probs:
            probs, dropped, *keeps = rest
            return (*_attention_grads(q, k, v, grad_out, row_dot, probs, runs, keeps, dropped, ctx.scale),
                    None, None, None)
        mask, *lanes = rest
        batch_heads, t_q, _ = q.shape
        grad_q = torch.empty_like(q)
        grad_k = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        grad_v = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        for start, stop in _query_chunks(batch_heads, t_q, k.shape[1]):
            rows = slice(start, stop)
            probs = _attention_probs(q[:, rows], k, _mask_rows(mask, start, stop), ctx.scale)
            keeps = [_keep_scale(run_lanes[:, rows], run[0]) for run_lanes, run in zip(lanes, runs)]
            dropped = _drop_runs(probs, runs, keeps)
            chunk_q, chunk_k, chunk_v = _attention_grads(q[:, rows], k, v, grad_out[:, rows], row_dot[:, rows],
                                                         probs, runs, keeps, dropped, ctx.scale)
            grad_q[:, rows] = chunk_q
            grad_k += chunk_k.float()
            grad_v += chunk_v.float()
        return grad_q, grad_k.to(k.dtype), grad_v.to(v.dtype), None, None, None


def _times_values(weights, values):
    """weights (N, T, S) @ values (N, S, d), computed as (values^T @ weights^T)^T.

    Heads are narrow (d = 4 or 8 in MulT). A (T, d) product leaves the CPU matmul kernel a d-wide
    output to vectorise over; its transpose (d, T) is T wide, and runs 2-5x faster for MulT's shapes
    (aligned and unaligned). The result is a transposed view, which every caller reshapes anyway.
    """
    return torch.bmm(values.transpose(1, 2), weights.transpose(1, 2)).transpose(1, 2)


def _attention_grads(q, k, v, grad_out, row_dot, probs, runs, keeps, dropped, scale):
    """Gradients of q, k, v for one chunk of query rows; `dropped` = probs with each run's dropout
    multiplier `keeps` applied (probs when nothing drops).

    The three products with a head-wide (d) output are computed transposed, as in `_times_values`.
    """
    grad_v = torch.bmm(grad_out.transpose(1, 2), dropped.to(v.dtype)).transpose(1, 2)
    grad_scores = _drop_runs(torch.bmm(grad_out, v.transpose(1, 2)).float(), runs, keeps, in_place=True)
    grad_scores = grad_scores.sub_(row_dot).mul_(probs).to(q.dtype)
    grad_q = _times_values(grad_scores, k).mul_(scale)
    grad_k = torch.bmm(q.transpose(1, 2), grad_scores).transpose(1, 2).mul_(scale)
    return grad_q, grad_k, grad_v


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
        x = add_dropout(x, attended, self.res_dropout, self.training)

        hidden = F.relu(self.fc1(self.layer_norms[1](x)))
        hidden = dropout(hidden, self.relu_dropout, self.training)
        return add_dropout(x, self.fc2(hidden), self.res_dropout, self.training)


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

    def forward(self, x_in, x_in_k=None, x_in_v=None, last_step: bool = False):
        """(T, B, E) -> (T, B, E); with `last_step`, only the output's last time step, (B, E).

        The last layer's other query rows feed nothing then, so only the last one is computed: it
        still attends to every key of that layer, which is all its own output depends on.
        """
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
        for depth, layer in enumerate(self.layers):
            if last_step and depth == len(self.layers) - 1:
                last_mask = None if mask is None else mask[-1:]
                if x_k is None:  # self-attention: the last query against all of this layer's steps
                    x = layer(x[-1:], x, x, mask=last_mask)
                else:
                    x = layer(x[-1:], x_k, x_v, mask=last_mask)
            else:
                x = layer(x, x_k, x_v, mask=mask)
        return self.layer_norm(x[-1]) if last_step else self.layer_norm(x)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The reference keeps a version counter and a dtype-tracking dummy for its position table;
        # neither holds weights, so they are dropped here and strict loading still checks every
        # real parameter.
        for name in _WEIGHTLESS_REFERENCE_BUFFERS:
            state_dict.pop(prefix + name, None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
