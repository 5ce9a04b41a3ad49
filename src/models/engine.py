"""Execution engines for MulT-style encoders: the plain modules as written, or a faster computation
of exactly the same thing.

`run_encoders(encoders, queries, keys=None, last_step=False, engine=...)` returns what
`[encoder(q, k, k, last_step=last_step) for ...]` returns, for a list of `TransformerEncoder`s
(src/models/encoder.py). Two engines:

- "plain": exactly that loop; the encoders' own forward, on any device.
- "fast": the same computation rearranged for speed and memory, on the encoders' own parameters
  (stacked per forward, so gradients flow back to each encoder's parameters and a frozen encoder
  stays frozen; no second copy of any weight is kept):
  - encoders of one shape whose sequences have similar lengths run as one batch (sequences
    zero-padded to a common length, padded keys masked out, padded query rows dropped): on short
    aligned sequences a CPU step is dominated by the cost per operation, not by arithmetic;
  - both pre-LayerNorms' affine parts are folded into the Linear they feed, and the feed-forward
    dropout's rescale into fc2's weight, so activations need fewer elementwise passes;
  - a crossmodal key/value sequence is normalised once and projected for all layers in one matmul
    (every layer reads the same sequence); key and value share one embedding outside training
    with embedding dropout, where they are equal;
  - with `last_step`, the last layer computes only the last query row (all that is read);
  - on a CPU, dropout draws 16 random bits per element from 64-bit words instead of calling
    `bernoulli_`, a residual connection adds its dropped-out branch in one multiply-add, and
    attention in training runs through `_DropoutAttention`, whose hand-written backward keeps less
    for backward than SDPA's unfused math path (which is what SDPA runs with dropout on a CPU) and,
    for long sequences, recomputes the softmax chunk by chunk.
  Its contract (tests/test_engine.py): equal to "plain" in eval outputs and in every parameter's
  gradient (training mode without dropout), the same dropout distribution in training.

`attend(attention, query, key, value, engine)` does the same for one unmasked `MultiheadAttention`
(PMR's units). `resolve_engine("auto", device)` picks the one measured faster on that device type
(benchmarks/speed.py).
"""
import math
import operator
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .encoder import MultiheadAttention, TransformerEncoder, embed_input, future_mask

ENGINES = ("plain", "fast")


def resolve_engine(name: str, device) -> str:
    """"plain" or "fast" for an engine name of ENGINES or "auto".

    auto: "fast" on a CPU, where benchmarks/speed.py measures it faster; "plain" elsewhere, where
    SDPA's fused kernels run the plain modules and the fast engine has not been measured to win.
    """
    if name == "auto":
        return "fast" if torch.device(device).type == "cpu" else "plain"
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r} (model.backbone_params.engine); valid: auto, {', '.join(ENGINES)}")
    return name


def run_encoders(encoders, queries, keys=None, last_step: bool = False, engine: str = "fast"):
    """One output per encoder: `encoder(query, key, key, last_step=last_step)` (or `encoder(query,
    last_step=last_step)` without keys), computed by `engine` ("plain" or "fast")."""
    if len(queries) != len(encoders) or (keys is not None and len(keys) != len(encoders)):
        raise ValueError(f"run_encoders takes one sequence per encoder: {len(encoders)} encoders, "
                         f"{len(queries)} queries, {'no' if keys is None else len(keys)} keys")
    if engine == "plain":
        if keys is None:
            return [encoder(query, last_step=last_step) for encoder, query in zip(encoders, queries)]
        return [encoder(query, key, key, last_step=last_step) for encoder, query, key in zip(encoders, queries, keys)]
    if engine != "fast":
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)} (or auto, resolved first)")
    # Encoders of one configuration are computed together; the others each alone.
    outputs = [None] * len(encoders)
    for indices in _groups(encoders):
        group = [encoders[i] for i in indices]
        group_keys = None if keys is None else [keys[i] for i in indices]
        for i, out in zip(indices, _run_group(group, [queries[i] for i in indices], group_keys, last_step)):
            outputs[i] = out
    return outputs


def attend(attention: MultiheadAttention, query, key, value, engine: str = "fast"):
    """`attention(query, key, value)` without a mask, computed by `engine`: "fast" runs a CPU training
    step's attention through `_DropoutAttention` on the module's own weights (SDPA would take its
    unfused math path, which keeps several (B, H, T_q, T_k) tensors for backward); otherwise, and
    with "plain", the module's forward."""
    if engine == "plain" or not (attention.training and attention.attn_dropout > 0 and query.device.type == "cpu"):
        return attention(query, key, value)
    heads, head_dim = attention.num_heads, attention.head_dim
    weights, biases = attention.in_proj_weight.chunk(3), attention.in_proj_bias.chunk(3)

    def project(x, index):  # (T, B, E) -> (B·H, T, head_dim)
        length, batch, _ = x.shape
        return F.linear(x, weights[index], biases[index]).reshape(length, batch * heads, head_dim).transpose(0, 1)

    attended = _DropoutAttention.apply(project(query, 0), project(key, 1), project(value, 2), None,
                                       float(attention.attn_dropout), head_dim ** -0.5)
    t_q, batch = query.shape[0], query.shape[1]
    return attention.out_proj(attended.transpose(0, 1).reshape(t_q, batch, attention.embed_dim))


# --- what the fast engine reads of a plain encoder ------------------------------------------------

# Each layer's parameters, by the name the batched computation gives them.
LAYER_PARAMETERS = {
    "in_proj_weight": operator.attrgetter("self_attn.in_proj_weight"),
    "in_proj_bias": operator.attrgetter("self_attn.in_proj_bias"),
    "out_proj_weight": operator.attrgetter("self_attn.out_proj.weight"),
    "out_proj_bias": operator.attrgetter("self_attn.out_proj.bias"),
    "fc1_weight": operator.attrgetter("fc1.weight"),
    "fc1_bias": operator.attrgetter("fc1.bias"),
    "fc2_weight": operator.attrgetter("fc2.weight"),
    "fc2_bias": operator.attrgetter("fc2.bias"),
    "norm0_weight": lambda layer: layer.layer_norms[0].weight,
    "norm0_bias": lambda layer: layer.layer_norms[0].bias,
    "norm1_weight": lambda layer: layer.layer_norms[1].weight,
    "norm1_bias": lambda layer: layer.layer_norms[1].bias,
}


@dataclass(frozen=True)
class _Config:
    """What the batched computation needs of a group of encoders besides their weights."""
    embed_dim: int
    num_heads: int
    depth: int
    relu_dropout: float
    res_dropout: float
    embed_dropout: float
    attn_mask: bool
    eps: float
    training: bool
    attn_dropouts: tuple = ()  # one per encoder of the group, in the group's order


def _signature(encoder: TransformerEncoder):
    """The configuration an encoder shares with the others of its group, or None when its layers
    differ among themselves (then it runs alone, through its own forward)."""
    layers = encoder.layers
    first = layers[0]
    per_layer = {(layer.self_attn.embed_dim, layer.self_attn.num_heads, layer.self_attn.attn_dropout,
                  layer.relu_dropout, layer.res_dropout, layer.layer_norms[0].eps, layer.layer_norms[1].eps,
                  layer.training, layer.self_attn.training) for layer in layers}
    if len(per_layer) != 1 or encoder.layer_norm.eps != first.layer_norms[0].eps:
        return None
    return (first.self_attn.embed_dim, first.self_attn.num_heads, len(layers), first.relu_dropout,
            first.res_dropout, encoder.embed_dropout, encoder.attn_mask, first.layer_norms[0].eps,
            encoder.training)


def _groups(encoders):
    """Indices of the encoders, grouped by shared configuration (attention dropout may differ)."""
    groups, alone = {}, []
    for index, encoder in enumerate(encoders):
        signature = _signature(encoder)
        if signature is None:
            alone.append([index])
        else:
            groups.setdefault(signature, []).append(index)
    return list(groups.values()) + alone


def _config(encoders, order) -> _Config:
    first = encoders[0]
    layer = first.layers[0]
    return _Config(embed_dim=layer.self_attn.embed_dim, num_heads=layer.self_attn.num_heads, depth=len(first.layers),
                   relu_dropout=layer.relu_dropout, res_dropout=layer.res_dropout, embed_dropout=first.embed_dropout,
                   attn_mask=first.attn_mask, eps=layer.layer_norms[0].eps, training=first.training,
                   attn_dropouts=tuple(float(encoders[g].layers[0].self_attn.attn_dropout) for g in order))


def _stacked_weights(encoders, depth):
    """The encoders' own parameters as (depth, G, ...) tensors (final LayerNorm: (G, E)), one
    `torch.stack` per kind: autograd sends each slice's gradient back to its own parameter."""
    weights = {}
    for name, get in LAYER_PARAMETERS.items():
        tensors = [get(encoder.layers[d]) for d in range(depth) for encoder in encoders]
        weights[name] = torch.stack(tensors).view(depth, len(encoders), *tensors[0].shape)
    weights["final_norm_weight"] = torch.stack([encoder.layer_norm.weight for encoder in encoders])
    weights["final_norm_bias"] = torch.stack([encoder.layer_norm.bias for encoder in encoders])
    return weights


def _run_group(encoders, queries, keys, last_step):
    """Encoders of one configuration: as one batch when their lengths are similar, else each alone."""
    if len(encoders) == 1 and _signature(encoders[0]) is None:
        encoder, key = encoders[0], None if keys is None else keys[0]
        return [encoder(queries[0], last_step=last_step) if key is None else encoder(queries[0], key, key, last_step=last_step)]
    # Ordered by attention dropout (stable), so each probability's encoders form one contiguous
    # block that the attention runs on at once.
    order = sorted(range(len(encoders)), key=lambda g: encoders[g].layers[0].self_attn.attn_dropout)
    ordered = [encoders[g] for g in order]
    config = _config(encoders, order)
    queries = [queries[g] for g in order]
    keys = None if keys is None else [keys[g] for g in order]
    query_lengths = [q.shape[0] for q in queries]
    key_lengths = query_lengths if keys is None else [k.shape[0] for k in keys]
    if worth_grouping(query_lengths, key_lengths):
        outputs = _run(config, _stacked_weights(ordered, config.depth), range(len(ordered)), queries, keys, last_step)
    else:
        outputs = []
        for index, encoder in enumerate(ordered):
            outputs += _run(config, _stacked_weights([encoder], config.depth), [index], queries[index:index + 1],
                            None if keys is None else keys[index:index + 1], last_step)
    result = [None] * len(encoders)
    for position, g in enumerate(order):
        result[g] = outputs[position]
    return result


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
    vectorised float ops are faster on CPU than boolean masks.
    """
    threshold = -32768 + round(p * 65536)
    return lanes.to(torch.float32).sub_(threshold - 1).clamp_(0.0, 1.0)


def _keep_scale(lanes: torch.Tensor, p: float) -> torch.Tensor:
    """The dropout multiplier: `_keep_mask` times 1/(1-p); all zeros for p = 1 (nothing is kept)."""
    if p >= 1.0:
        return torch.zeros(lanes.shape, dtype=torch.float32, device=lanes.device)
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
    ((p, start, stop), ...) giving runs of rows their own (encoders of a group differ in attention
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
    output to vectorise over; its transpose (d, T) is T wide, which the kernel runs faster for MulT's shapes
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


def worth_grouping(query_lengths, key_lengths, max_padding=0.25) -> bool:
    """Whether padding every encoder's sequences to the longest adds at most `max_padding` to the
    attention and feed-forward work (aligned data: yes; unaligned: no)."""
    t_max, s_max = max(query_lengths), max(key_lengths)
    real = sum(t * s + t for t, s in zip(query_lengths, key_lengths))
    padded = len(query_lengths) * (t_max * s_max + t_max)
    return padded <= (1 + max_padding) * real


# --- the batched computation ----------------------------------------------------------------------

@lru_cache(maxsize=32)
def _padded_mask(query_lengths, key_lengths, batch, heads, attn_mask, device, dtype):
    """(G·B·H, T, S) additive mask for encoders padded to T = max T_g, S = max S_g.

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


@lru_cache(maxsize=32)
def _last_steps(query_lengths, device):
    """(encoder index, index of its last real step) tensors for picking each encoder's last query step;
    cached, so no per-forward host-to-device copy."""
    with torch.inference_mode(False):
        return (torch.arange(len(query_lengths), device=device),
                torch.tensor([length - 1 for length in query_lengths], device=device))


def _attention_mask(query_lengths, key_lengths, batch, heads, attn_mask, device, dtype):
    """None, a (T, S) mask shared by every encoder and batch row (equal lengths: no padding), or a
    (G·B·H, T, S) one for padded encoders."""
    if len(set(query_lengths)) == 1 and len(set(key_lengths)) == 1:
        return future_mask(query_lengths[0], key_lengths[0], device, dtype) if attn_mask else None
    return _padded_mask(tuple(query_lengths), tuple(key_lengths), batch, heads, attn_mask, device, dtype)


def _embed(x, config):
    """Each encoder's input embedding on padded (G, B, T, E), with this module's dropout.

    Padded steps are zero in every channel, so the zero-as-padding rule gives them no position
    either: their embedding stays zero, as when each sequence is embedded and then padded.
    """
    return embed_input(x, config.embed_dropout, config.training, time_dim=2, dropout=dropout)


def _pad_and_stack(sequences, length):
    """List of (T_g, B, E) -> (G, B, length, E): batch-first, zero-padded at the end of time.

    Batch-first lets the attention heads be split and merged as views around the attention.
    """
    return torch.stack([F.pad(x.transpose(0, 1), (0, 0, 0, length - x.shape[0])) for x in sequences])


def _fold_layer_norm(norm_weight, norm_bias, weight, bias):
    """The affine part of a LayerNorm folded into the Linear it feeds, for stacked (depth, G) weights.

    (x̂∘γ + β)·W + b = x̂·(γ∘W) + (β·W + b), with W (..., in, out) in input-major layout: the
    normalised activations then need no extra elementwise pass forward or backward, only the
    (small) weights do.
    """
    folded_bias = bias + (norm_bias.unsqueeze(-2) @ weight).squeeze(-2)
    return weight * norm_weight.unsqueeze(-1), folded_bias


def _grouped_linear(x, weight, bias):
    """x (G, B, T, in) through G Linear maps at once: weight (G, in, out), bias (G, out)."""
    out = torch.baddbmm(bias.unsqueeze(1), x.reshape(x.shape[0], -1, x.shape[-1]), weight)
    return out.view(*x.shape[:-1], -1)


def _attention_runs(config, indices, batch, training):
    """(p, first row, end row) over the (G·B) batch: one run per distinct attention dropout of the
    encoders `indices` (contiguous, since the group is ordered by it); one p = 0 run in eval mode."""
    if not training:
        return [(0.0, 0, len(indices) * batch)]
    probabilities = [config.attn_dropouts[i] for i in indices]
    runs = []
    for p in sorted(set(probabilities)):
        rows = [g for g, q in enumerate(probabilities) if q == p]
        runs.append((p, rows[0] * batch, (rows[-1] + 1) * batch))
    return runs


def _attend(q, k, v, mask, runs, heads, on_cpu_training):
    """Attention over (G·B, H, T, d) q and (G·B, H, S, d) k, v; `mask` None, (T, S) or (G·B·H, T, S).

    Each run of rows has its own dropout probability. Training on a CPU uses `_DropoutAttention`
    (a hand-written backward, faster than SDPA's math path for these small heads) once for all
    runs; elsewhere SDPA, once per run.
    """
    rows, _, t_q, head_dim = q.shape
    drops = any(p > 0 for p, _, _ in runs)
    small = rows * heads * t_q * k.shape[2] <= _SCORE_BLOCK_ELEMENTS
    # Long sequences without dropout: SDPA's fused kernel keeps less memory than recomputing chunks.
    if on_cpu_training and (drops or small):
        return _DropoutAttention.apply(
            q.reshape(-1, t_q, head_dim), k.reshape(-1, k.shape[2], head_dim), v.reshape(-1, v.shape[2], head_dim),
            mask, tuple((p, start * heads, stop * heads) for p, start, stop in runs), head_dim ** -0.5,
        ).view(rows, heads, t_q, head_dim)
    sizes = [stop - start for _, start, stop in runs]
    if len(runs) > 1:  # `split`, not slices: its backward is one cat, not a zero-filled tensor per slice
        q, k, v = q.split(sizes), k.split(sizes), v.split(sizes)
    else:
        q, k, v = [q], [k], [v]
    parts = []
    for (p, start, stop), q_run, k_run, v_run in zip(runs, q, k, v):
        run_mask = mask
        if mask is not None and mask.dim() == 3:
            run_mask = mask[start * heads:stop * heads].view(stop - start, heads, t_q, -1)
        parts.append(F.scaled_dot_product_attention(q_run, k_run, v_run, attn_mask=run_mask, dropout_p=p))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _run(config, weights, indices, queries, keys, last_step):
    """The encoders `indices` (group order) on their sequences, with `weights` their (depth, G, ...) slices."""
    groups = len(queries)
    training = config.training
    crossmodal = keys is not None
    query_lengths = [x.shape[0] for x in queries]
    key_lengths = [k.shape[0] for k in keys] if crossmodal else query_lengths
    t_max, s_max = max(query_lengths), max(key_lengths)
    batch, embed_dim, heads = queries[0].shape[1], config.embed_dim, config.num_heads
    head_dim = embed_dim // heads

    x = _embed(_pad_and_stack(queries, t_max), config)
    if crossmodal:
        raw_keys = _pad_and_stack(keys, s_max)
        kv = _embed(raw_keys, config)
        # the reference embeds key and value separately: under embedding dropout they differ
        value = _embed(raw_keys, config) if training and config.embed_dropout > 0 else kv

    mask = _attention_mask(query_lengths, key_lengths, batch, heads, config.attn_mask, x.device, x.dtype)
    runs = _attention_runs(config, indices, batch, training)
    on_cpu_training = training and x.device.type == "cpu"

    def input_major(name):  # Linear weights (..., out, in) as (..., in, out) views
        return weights[name].transpose(-1, -2)

    # Both pre-LayerNorms feed a Linear (LN0 the in-projection, LN1 fc1), so their affine parts
    # are folded into those weights and the activations are only normalised.
    in_w, in_b = _fold_layer_norm(weights["norm0_weight"], weights["norm0_bias"], input_major("in_proj_weight"),
                                  weights["in_proj_bias"])
    fc1_w, fc1_b = _fold_layer_norm(weights["norm1_weight"], weights["norm1_bias"], input_major("fc1_weight"),
                                    weights["fc1_bias"])
    out_w, out_b = input_major("out_proj_weight"), weights["out_proj_bias"]
    res_p, relu_p = config.res_dropout, config.relu_dropout
    # fc2 reads the feed-forward hidden units after dropout: their rescale is folded into its weight
    fc2_w, fc2_b = input_major("fc2_weight") * _dropout_rescale(relu_p, training), weights["fc2_bias"]

    def normalize(t):
        return F.layer_norm(t, t.shape[-1:], eps=config.eps)

    if crossmodal:
        # Every layer reads the same key/value sequence, and with LN0's affine part folded into the
        # in-projection, the same *normalised* sequence: normalise it once and project it for all
        # layers in one matmul, (G, B·S, E) x (G, E, depth·width).
        def every_layer(columns):  # in-projection columns of every layer side by side
            weight = in_w[..., columns].permute(1, 2, 0, 3).flatten(2)
            return weight, in_b[..., columns].transpose(0, 1).flatten(1)

        kv_in = normalize(kv)
        if value is kv:
            projected = _grouped_linear(kv_in, *every_layer(slice(embed_dim, None))).chunk(config.depth, dim=-1)
            layer_keys_values = [t.chunk(2, dim=-1) for t in projected]
        else:
            layer_keys = _grouped_linear(kv_in, *every_layer(slice(embed_dim, 2 * embed_dim)))
            layer_values = _grouped_linear(normalize(value), *every_layer(slice(2 * embed_dim, None)))
            layer_keys_values = list(zip(layer_keys.chunk(config.depth, dim=-1), layer_values.chunk(config.depth, dim=-1)))
        in_w, in_b = in_w[..., :embed_dim], in_b[..., :embed_dim]  # query columns only
    # Per-depth views by `unbind` and `split`, whose backward is one stack/cat; indexing and slicing
    # would each allocate and fill a zero gradient of the whole tensor.
    in_w, in_b, out_w, out_b = in_w.unbind(0), in_b.unbind(0), out_w.unbind(0), out_b.unbind(0)
    fc1_w, fc1_b, fc2_w, fc2_b = fc1_w.unbind(0), fc1_b.unbind(0), fc2_w.unbind(0), fc2_b.unbind(0)

    def split_heads(t):  # (G, B, L, E) -> (G·B, H, L, head_dim), a view
        return t.view(groups * batch, t.shape[2], heads, head_dim).transpose(1, 2)

    if last_step:  # each encoder's last real query step, and its mask row
        group_index, last_index = _last_steps(tuple(query_lengths), x.device)
        if mask is None or mask.dim() == 2:
            last_mask = None if mask is None else mask[-1:]
        else:
            last_mask = mask.view(groups, batch * heads, t_max, s_max)[group_index, :, last_index]
            last_mask = last_mask.reshape(groups * batch * heads, 1, s_max)

    for depth in range(config.depth):
        w, b = in_w[depth], in_b[depth]  # (G, E, 3E), (G, 3E): query, key, value columns (crossmodal: query)
        if last_step and depth == config.depth - 1:
            # Only the last step is read: its query row alone, against every key of this layer.
            query, layer_mask = x[group_index, :, last_index].unsqueeze(2), last_mask
        else:
            query, layer_mask = x, mask
        t_q = query.shape[2]
        q_in = normalize(query)
        if crossmodal:
            q = _grouped_linear(q_in, w, b)
            k, v = layer_keys_values[depth]
        elif query is not x:  # self-attention from the last step only
            (w_q, w_kv), (b_q, b_kv) = w.split([embed_dim, 2 * embed_dim], -1), b.split([embed_dim, 2 * embed_dim], -1)
            q = _grouped_linear(q_in, w_q, b_q)
            k, v = _grouped_linear(normalize(x), w_kv, b_kv).chunk(2, dim=-1)
        else:
            q, k, v = _grouped_linear(q_in, w, b).chunk(3, dim=-1)
        attended = _attend(split_heads(q), split_heads(k), split_heads(v), layer_mask, runs, heads, on_cpu_training)
        attended = attended.transpose(1, 2).reshape(groups, batch, t_q, embed_dim)
        x = add_dropout(query, _grouped_linear(attended, out_w[depth], out_b[depth]), res_p, training)

        hidden = normalize(x)
        hidden = relu_dropout_unscaled(_grouped_linear(hidden, fc1_w[depth], fc1_b[depth]), relu_p, training)
        x = add_dropout(x, _grouped_linear(hidden, fc2_w[depth], fc2_b[depth]), res_p, training)

    shape = (groups, 1, 1, embed_dim)  # the final LayerNorm, one (weight, bias) per encoder
    x = torch.addcmul(weights["final_norm_bias"].view(shape), normalize(x), weights["final_norm_weight"].view(shape))
    if last_step:
        return list(x[:, :, -1].unbind(0))
    return [x[g, :, :length].transpose(0, 1) for g, length in enumerate(query_lengths)]


