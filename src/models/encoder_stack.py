"""Same-shaped transformer encoders stored as stacked weights and run as one batched computation.

MulT runs six crossmodal encoders of one shape and three memory encoders of another (SPEC §2). On
aligned data their sequences are short, so a CPU step is dominated by the cost per *operation*,
not by arithmetic: `EncoderStack` keeps G encoders' weights as (depth, G, ...) tensors and runs the
G encoders as one batch (sequences zero-padded to a common length, padded keys masked out, padded
query rows dropped), doing each layer's work in the operations of one encoder. Because the weights
*are* stacked, nothing is stacked per step either: autograd, gradient clipping and Adam see 14
tensors per stack instead of 12·depth·G + 2·G.

Each member computes exactly what a `TransformerEncoder` with its weights computes (eval mode: to
float rounding; training: the same distribution). When the members' lengths differ too much for
padding to pay (unaligned data), each runs alone through the same code on its slice of the stack.

state_dicts keep every member's own names (`<member>.layers.<d>.fc1.weight`, ...), the reference
encoder's, through hooks on the module that holds the stack (`register_member_names`), so the
reference's state_dicts and earlier checkpoints load unchanged.
"""
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from src.models import encoder
from src.models.encoder import (
    _WEIGHTLESS_REFERENCE_BUFFERS,
    TransformerEncoder,
    _DropoutAttention,
    _dropout_rescale,
    _position_table,
    add_dropout,
    dropout,
    future_mask,
    relu_dropout_unscaled,
)

# Each layer's stacked weight -> its name inside one reference encoder layer.
LAYER_PARAMETERS = {
    "in_proj_weight": "self_attn.in_proj_weight",
    "in_proj_bias": "self_attn.in_proj_bias",
    "out_proj_weight": "self_attn.out_proj.weight",
    "out_proj_bias": "self_attn.out_proj.bias",
    "fc1_weight": "fc1.weight",
    "fc1_bias": "fc1.bias",
    "fc2_weight": "fc2.weight",
    "fc2_bias": "fc2.bias",
    "norm0_weight": "layer_norms.0.weight",
    "norm0_bias": "layer_norms.0.bias",
    "norm1_weight": "layer_norms.1.weight",
    "norm1_bias": "layer_norms.1.bias",
}
# The final LayerNorm's stacked weights (G, E) -> their names inside one reference encoder.
FINAL_PARAMETERS = {"final_norm_weight": "layer_norm.weight", "final_norm_bias": "layer_norm.bias"}


class EncoderStack(nn.Module):
    """`len(names)` pre-LayerNorm transformer encoders of one shape (SPEC §2) with stacked weights.

    `attn_dropouts` gives each member's attention dropout (MulT's crossmodal encoders take their
    source modality's); everything else is shared. `forward(queries, keys=None, last_step=False)`
    takes one (T_g, B, E) sequence per member, in `names` order, and returns one output per member,
    as `TransformerEncoder.forward(query, key, key, last_step)` would.
    """

    def __init__(self, names, embed_dim, num_heads, layers, attn_dropouts, relu_dropout=0.0, res_dropout=0.0,
                 embed_dropout=0.0, attn_mask=False):
        super().__init__()
        if len(names) != len(attn_dropouts) or not names:
            raise ValueError(f"an encoder stack needs one attention dropout per member: {len(names)} names, "
                             f"{len(attn_dropouts)} dropouts")
        self.embed_dim, self.num_heads, self.depth = embed_dim, num_heads, layers
        self.relu_dropout, self.res_dropout = relu_dropout, res_dropout
        self.embed_dropout, self.attn_mask = embed_dropout, attn_mask
        # Built as separate encoders, in `names` order, so the initial weights are exactly those of
        # separately built encoders: the same random draws in the same order.
        members = [self._encoder(p) for p in attn_dropouts]
        # Stack order: by attention dropout (stable), so each probability's members form one
        # contiguous block that the attention can run on at once.
        self.names = tuple(names)
        self.order = tuple(sorted(range(len(names)), key=lambda g: attn_dropouts[g]))  # stack index -> member
        self.position = {self.names[g]: index for index, g in enumerate(self.order)}  # member -> stack index
        self.attn_dropouts = tuple(float(attn_dropouts[g]) for g in self.order)  # in stack order
        self.embed_scale = members[0].embed_scale
        self.eps = members[0].layer_norm.eps
        with torch.no_grad():
            for stacked, inner in LAYER_PARAMETERS.items():
                tensor = torch.stack([torch.stack([members[g].get_parameter(f"layers.{d}.{inner}") for g in self.order])
                                      for d in range(layers)])
                self.register_parameter(stacked, nn.Parameter(tensor))
            for stacked, inner in FINAL_PARAMETERS.items():
                tensor = torch.stack([members[g].get_parameter(inner) for g in self.order])
                self.register_parameter(stacked, nn.Parameter(tensor))

    def _encoder(self, attn_dropout) -> TransformerEncoder:
        return TransformerEncoder(self.embed_dim, self.num_heads, self.depth, attn_dropout=attn_dropout,
                                  relu_dropout=self.relu_dropout, res_dropout=self.res_dropout,
                                  embed_dropout=self.embed_dropout, attn_mask=self.attn_mask)

    def attn_dropout(self, name: str) -> float:
        return self.attn_dropouts[self.position[name]]

    def extra_repr(self) -> str:
        return (f"{len(self.names)} x (embed_dim={self.embed_dim}, heads={self.num_heads}, depth={self.depth}), "
                f"members={list(self.names)}")

    # --- state_dict under the members' own names ---------------------------------------------------

    def member_entries(self):
        """(stacked parameter name, index into it, the member's own key) for every member weight."""
        for stacked, inner in LAYER_PARAMETERS.items():
            for depth in range(self.depth):
                for name in self.names:
                    yield stacked, (depth, self.position[name]), f"{name}.layers.{depth}.{inner}"
        for stacked, inner in FINAL_PARAMETERS.items():
            for name in self.names:
                yield stacked, (self.position[name],), f"{name}.{inner}"

    def member(self, name: str) -> TransformerEncoder:
        """A standalone `TransformerEncoder` holding a copy of member `name`'s weights."""
        encoder = self._encoder(self.attn_dropout(name))
        state = {key[len(name) + 1:]: getattr(self, stacked)[index]
                 for stacked, index, key in self.member_entries() if key.startswith(name + ".")}
        encoder.load_state_dict(state)
        encoder.train(self.training)
        return encoder

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, queries, keys=None, last_step: bool = False, group: bool = True):
        """One (T_g, B, E) query sequence per member (and key/value sequence, for crossmodal
        attention), in `names` order -> one output per member: (T_g, B, E), or (B, E) with
        `last_step` (the last time step only; the last layer then computes only that query row).

        With similar lengths the members run as one batch; otherwise (or with `group=False`) each
        runs alone.
        """
        if len(queries) != len(self.names) or (keys is not None and len(keys) != len(self.names)):
            raise ValueError(f"this encoder stack has {len(self.names)} members and takes one sequence for each")
        queries = [queries[g] for g in self.order]
        keys = None if keys is None else [keys[g] for g in self.order]
        weights = {name: parameter for name, parameter in self.named_parameters(recurse=False)}
        query_lengths = [q.shape[0] for q in queries]
        key_lengths = query_lengths if keys is None else [k.shape[0] for k in keys]
        if group and worth_grouping(query_lengths, key_lengths):
            outputs = _run(self, weights, range(len(queries)), queries, keys, last_step)
        else:
            # each member alone, on its slice of the stack (`split`: one backward op per weight)
            slices = {name: w.split(1, dim=1 if name in LAYER_PARAMETERS else 0) for name, w in weights.items()}
            outputs = []
            for index in range(len(queries)):
                alone = {name: pieces[index] for name, pieces in slices.items()}
                outputs += _run(self, alone, [index], queries[index:index + 1],
                                None if keys is None else keys[index:index + 1], last_step)
        return [outputs[self.position[name]] for name in self.names]


def worth_grouping(query_lengths, key_lengths, max_padding=0.25) -> bool:
    """Whether padding every member's sequences to the longest adds at most `max_padding` to the
    attention and feed-forward work (aligned data: yes; unaligned: no)."""
    t_max, s_max = max(query_lengths), max(key_lengths)
    real = sum(t * s + t for t, s in zip(query_lengths, key_lengths))
    padded = len(query_lengths) * (t_max * s_max + t_max)
    return padded <= (1 + max_padding) * real


# --- the batched computation ----------------------------------------------------------------------

@lru_cache(maxsize=32)
def _padded_mask(query_lengths, key_lengths, batch, heads, attn_mask, device, dtype):
    """(G·B·H, T, S) additive mask for members padded to T = max T_g, S = max S_g.

    Member g's padded keys (j >= S_g) are blocked for every query, and with `attn_mask` its own
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
    """(member index, index of its last real step) tensors for picking each member's last query step;
    cached, so no per-forward host-to-device copy."""
    with torch.inference_mode(False):
        return (torch.arange(len(query_lengths), device=device),
                torch.tensor([length - 1 for length in query_lengths], device=device))


def _attention_mask(query_lengths, key_lengths, batch, heads, attn_mask, device, dtype):
    """None, a (T, S) mask shared by every member and batch row (equal lengths: no padding), or a
    (G·B·H, T, S) one for padded members."""
    if len(set(query_lengths)) == 1 and len(set(key_lengths)) == 1:
        return future_mask(query_lengths[0], key_lengths[0], device, dtype) if attn_mask else None
    return _padded_mask(tuple(query_lengths), tuple(key_lengths), batch, heads, attn_mask, device, dtype)


def _pad_and_stack(sequences, length):
    """List of (T_g, B, E) -> (G, B, length, E): batch-first, zero-padded at the end of time.

    Batch-first lets the attention heads be split and merged as views around the attention.
    """
    return torch.stack([F.pad(x.transpose(0, 1), (0, 0, 0, length - x.shape[0])) for x in sequences])


def _embed(x, stack):
    """Each encoder's input embedding (√E scaling, sinusoidal positions, dropout) on padded (G, B, T, E).

    Padded steps are zero in every channel, so the zero-as-padding rule gives them no position
    either: their embedding stays zero, as when each sequence is embedded and then padded.
    """
    table = _position_table(x.shape[2], x.shape[3], x.device, x.dtype)  # (T, E)
    not_padding = (x[..., :1] != 0).to(x.dtype)  # (G, B, T, 1)
    x = torch.addcmul(x * stack.embed_scale, table, not_padding)
    return dropout(x, stack.embed_dropout, stack.training)


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


def _attention_runs(stack, indices, batch, training):
    """(p, first row, end row) over the (G·B) batch: one run per distinct attention dropout of the
    members `indices` (contiguous, since the stack is ordered by it); one p = 0 run in eval mode."""
    if not training:
        return [(0.0, 0, len(indices) * batch)]
    probabilities = [stack.attn_dropouts[i] for i in indices]
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
    small = rows * heads * t_q * k.shape[2] <= encoder._SCORE_BLOCK_ELEMENTS
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


def _run(stack, weights, indices, queries, keys, last_step):
    """The members `indices` (stack order) on their sequences, with `weights` their (depth, G, ...) slices."""
    groups = len(queries)
    training = stack.training
    crossmodal = keys is not None
    query_lengths = [x.shape[0] for x in queries]
    key_lengths = [k.shape[0] for k in keys] if crossmodal else query_lengths
    t_max, s_max = max(query_lengths), max(key_lengths)
    batch, embed_dim, heads = queries[0].shape[1], stack.embed_dim, stack.num_heads
    head_dim = embed_dim // heads

    x = _embed(_pad_and_stack(queries, t_max), stack)
    if crossmodal:
        raw_keys = _pad_and_stack(keys, s_max)
        kv = _embed(raw_keys, stack)
        # the reference embeds key and value separately: under embedding dropout they differ
        value = _embed(raw_keys, stack) if training and stack.embed_dropout > 0 else kv

    mask = _attention_mask(query_lengths, key_lengths, batch, heads, stack.attn_mask, x.device, x.dtype)
    runs = _attention_runs(stack, indices, batch, training)
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
    res_p, relu_p = stack.res_dropout, stack.relu_dropout
    # fc2 reads the feed-forward hidden units after dropout: their rescale is folded into its weight
    fc2_w, fc2_b = input_major("fc2_weight") * _dropout_rescale(relu_p, training), weights["fc2_bias"]

    def normalize(t):
        return F.layer_norm(t, t.shape[-1:], eps=stack.eps)

    if crossmodal:
        # Every layer reads the same key/value sequence, and with LN0's affine part folded into the
        # in-projection, the same *normalised* sequence: normalise it once and project it for all
        # layers in one matmul, (G, B·S, E) x (G, E, depth·width).
        def every_layer(columns):  # in-projection columns of every layer side by side
            weight = in_w[..., columns].permute(1, 2, 0, 3).flatten(2)
            return weight, in_b[..., columns].transpose(0, 1).flatten(1)

        kv_in = normalize(kv)
        if value is kv:
            projected = _grouped_linear(kv_in, *every_layer(slice(embed_dim, None))).chunk(stack.depth, dim=-1)
            layer_keys_values = [t.chunk(2, dim=-1) for t in projected]
        else:
            layer_keys = _grouped_linear(kv_in, *every_layer(slice(embed_dim, 2 * embed_dim)))
            layer_values = _grouped_linear(normalize(value), *every_layer(slice(2 * embed_dim, None)))
            layer_keys_values = list(zip(layer_keys.chunk(stack.depth, dim=-1), layer_values.chunk(stack.depth, dim=-1)))
        in_w, in_b = in_w[..., :embed_dim], in_b[..., :embed_dim]  # query columns only
    # Per-depth views by `unbind` and `split`, whose backward is one stack/cat; indexing and slicing
    # would each allocate and fill a zero gradient of the whole tensor.
    in_w, in_b, out_w, out_b = in_w.unbind(0), in_b.unbind(0), out_w.unbind(0), out_b.unbind(0)
    fc1_w, fc1_b, fc2_w, fc2_b = fc1_w.unbind(0), fc1_b.unbind(0), fc2_w.unbind(0), fc2_b.unbind(0)

    def split_heads(t):  # (G, B, L, E) -> (G·B, H, L, head_dim), a view
        return t.view(groups * batch, t.shape[2], heads, head_dim).transpose(1, 2)

    if last_step:  # each member's last real query step, and its mask row
        group_index, last_index = _last_steps(tuple(query_lengths), x.device)
        if mask is None or mask.dim() == 2:
            last_mask = None if mask is None else mask[-1:]
        else:
            last_mask = mask.view(groups, batch * heads, t_max, s_max)[group_index, :, last_index]
            last_mask = last_mask.reshape(groups * batch * heads, 1, s_max)

    for depth in range(stack.depth):
        w, b = in_w[depth], in_b[depth]  # (G, E, 3E), (G, 3E): query, key, value columns (crossmodal: query)
        if last_step and depth == stack.depth - 1:
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

    shape = (groups, 1, 1, embed_dim)  # the final LayerNorm, one (weight, bias) per member
    x = torch.addcmul(weights["final_norm_bias"].view(shape), normalize(x), weights["final_norm_weight"].view(shape))
    if last_step:
        return list(x[:, :, -1].unbind(0))
    return [x[g, :, :length].transpose(0, 1) for g, length in enumerate(query_lengths)]


# --- state_dicts under the members' own names -------------------------------------------------------

def register_member_names(module: nn.Module) -> None:
    """Make `module` save and load its `EncoderStack` children under their members' own names.

    A member named `trans_l_mem` then appears in `module.state_dict()` as `trans_l_mem.layers.0.fc1.weight`
    and so on, exactly the keys of a separate `TransformerEncoder` attribute of that name, and
    `load_state_dict` takes those keys (strictly: a missing member weight is reported under its
    own name, an unknown key stays unexpected).
    """
    if getattr(module, "_member_names_registered", False):
        return  # the hooks handle every stack of the module
    module.register_state_dict_post_hook(_export_members)
    module.register_load_state_dict_pre_hook(_import_members)
    module._member_names_registered = True


def _stacks(module):
    return [(name, child) for name, child in module.named_children() if isinstance(child, EncoderStack)]


def _export_members(module, state_dict, prefix, local_metadata):
    for attribute, stack in _stacks(module):
        stacked = {name: state_dict.pop(f"{prefix}{attribute}.{name}") for name in (*LAYER_PARAMETERS, *FINAL_PARAMETERS)}
        with torch.no_grad():
            for name, index, key in stack.member_entries():
                state_dict[prefix + key] = stacked[name][index]


def _import_members(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    for attribute, stack in _stacks(module):
        stack_prefix = f"{prefix}{attribute}."
        if any(stack_prefix + name in state_dict for name in (*LAYER_PARAMETERS, *FINAL_PARAMETERS)):
            continue  # already in stacked form
        for name in stack.names:
            for buffer in _WEIGHTLESS_REFERENCE_BUFFERS:
                state_dict.pop(f"{prefix}{name}.{buffer}", None)
        values = {name: parameter.detach().clone() for name, parameter in stack.named_parameters(recurse=False)}
        for name, index, key in stack.member_entries():
            full_key = prefix + key
            if full_key not in state_dict:
                missing_keys.append(full_key)
                continue
            tensor = state_dict.pop(full_key)
            target = values[name][index]
            if not isinstance(tensor, torch.Tensor) or tensor.shape != target.shape:
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                error_msgs.append(f"size mismatch for {full_key}: copying a param with shape {shape} from "
                                  f"checkpoint, the shape in current model is {tuple(target.shape)}.")
                continue
            with torch.no_grad():
                target.copy_(tensor)
        for name, value in values.items():
            state_dict[stack_prefix + name] = value
