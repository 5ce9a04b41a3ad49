"""PMR, Progressive Modality Reinforcement (Lv et al., CVPR 2021), as docs/design.md § PMR reads it.

A message hub C exchanges information with every modality, layer by layer:

text/audio/vision (B, L_m, d_m)
  -> Conv1d per modality (kernel k_m, no bias) to d, then √d scaling + sinusoidal positions + dropout
  -> hub C = time-concatenation of the three embedded sequences (order l, a, v)
  -> `layers` PMR layers, each:
       hub -> modality:  X_m <- MRU(source C, target X_m)                  for m in l, a, v
       modality -> hub:  Z_m  = MRU(source X_m (new), target C)            for m in l, a, v
       message update:   α = softmax_m(uᵀ tanh(W_m · mean_t(Z_m) + b_m)),  C̃ = Σ_m α_m Z_m,
                         C <- C̃ + FFN(LN(C̃))
  -> H = time-concatenation [C; X_l; X_v; X_a] -> MulT encoder (shifted mask) -> last time step h
  -> MulT's residual head proj1/proj2 -> out_layer = logits (B, output_dim)

A Modality Reinforcement Unit MRU(S, X) runs a crossmodal branch c (X attends to S) and a self
branch a (X attends to itself) side by side, mixes them with a learned per-feature gate
G = σ(a·W_a + c·W_c + b), y = G ⊙ c + (1 − G) ⊙ a, and ends with a pre-LN feed-forward block.

Choices where the paper is silent (fixed by the design, docs/design.md § PMR, or made here where marked "here"):
- the MRU's attentions use no mask, and both branches keep their residual connection;
- the message score reads the time-average of each candidate Z_m instead of its flattened sequence,
  so W_m is d×d whatever the lengths (the flattened form needs fixed lengths and ~26M parameters on
  unaligned MOSEI);
- here: the head count is used as configured (MulT's reference forces 10; the design sets 10 anyway);
- here: no extra dropout on the raw text features (MulT has one; the design's input stage has none);
- here: new Linear weights are xavier-uniform with zero biases, like MulT's encoder layers.

Tensors are sequence-first (T, B, E) inside, as the shared encoder code expects.

Cost: the hub has T_C = T_l + T_a + T_v steps. Attention scores per PMR layer, per head and sample:
hub -> modality crossmodal attention T_C·Σ_m T_m = T_C²; modality -> hub crossmodal attention
another T_C²; the three modality -> hub MRUs' self-attention over the hub 3·T_C²; the modalities'
own self-attention only Σ_m T_m². So about 5·T_C² per layer, plus 4·T_C² per layer of the final
encoder, which runs over 2·T_C steps: cost grows with the square of the summed lengths, and
attention over the hub dominates. The shared MultiheadAttention runs it through the fused SDPA
kernel where one exists.

`engine` (src/models/engine.py): "fast" computes the final encoder as the engine computes MulT's, and
the MRUs' attentions in CPU training through its attention function; "plain" runs the modules' forward.
"""
import torch
import torch.nn.functional as F
from torch import nn

from .encoder import MultiheadAttention, TransformerEncoder, embed_input
from .engine import attend, resolve_engine, run_encoders
from .heads import residual_head
from .projections import PROJECTION_NAMES, add_input_projections


def _xavier_linear(in_features: int, out_features: int, bias: bool = True) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias)
    nn.init.xavier_uniform_(linear.weight)
    if bias:
        nn.init.constant_(linear.bias, 0.0)
    return linear


class FeedForward(nn.Module):
    """Pre-LN position-wise block, returned as a residual update: drop(fc2(drop(relu(fc1(LN(x))))))."""

    def __init__(self, d_model: int, relu_dropout: float, res_dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.fc1 = _xavier_linear(d_model, 4 * d_model)
        self.fc2 = _xavier_linear(4 * d_model, d_model)
        self.relu_dropout = relu_dropout
        self.res_dropout = res_dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.dropout(F.relu(self.fc1(self.norm(x))), p=self.relu_dropout, training=self.training)
        return F.dropout(self.fc2(hidden), p=self.res_dropout, training=self.training)


class ModalityReinforcementUnit(nn.Module):
    """MRU(source S, target X) -> X' with X's shape; S and X are (T_S, B, d) and (T_X, B, d).

    `forward(source, target, engine="plain")`: `engine` computes the attentions (src/models/engine.py
    `attend`).
    """

    def __init__(self, d_model: int, num_heads: int, attn_dropout: float, relu_dropout: float,
                 res_dropout: float):
        super().__init__()
        self.res_dropout = res_dropout
        # LN_c normalises both the query (target) and the key/value (source), as MulT's crossmodal
        # layers do with their single LN0.
        self.cross_norm = nn.LayerNorm(d_model)
        self.cross_attn = MultiheadAttention(d_model, num_heads, attn_dropout)
        self.self_norm = nn.LayerNorm(d_model)
        self.self_attn = MultiheadAttention(d_model, num_heads, attn_dropout)
        # G = σ(a·W_a + c·W_c + b): W_a and b live in gate_self, W_c in gate_cross (no second bias).
        self.gate_self = _xavier_linear(d_model, d_model, bias=True)
        self.gate_cross = _xavier_linear(d_model, d_model, bias=False)
        self.feed_forward = FeedForward(d_model, relu_dropout, res_dropout)

    def crossmodal_branch(self, source: torch.Tensor, target: torch.Tensor, engine: str = "plain") -> torch.Tensor:
        """c = X + drop(CrossAttn(LN_c(X), LN_c(S)))."""
        query, key_value = self.cross_norm(target), self.cross_norm(source)
        attended = attend(self.cross_attn, query, key_value, key_value, engine)
        return target + F.dropout(attended, p=self.res_dropout, training=self.training)

    def self_branch(self, target: torch.Tensor, engine: str = "plain") -> torch.Tensor:
        """a = X + drop(SelfAttn(LN_a(X)))."""
        normed = self.self_norm(target)
        attended = attend(self.self_attn, normed, normed, normed, engine)
        return target + F.dropout(attended, p=self.res_dropout, training=self.training)

    def gate(self, self_out: torch.Tensor, cross_out: torch.Tensor) -> torch.Tensor:
        """G = σ(a·W_a + c·W_c + b), per time step and feature."""
        return torch.sigmoid(self.gate_self(self_out) + self.gate_cross(cross_out))

    def forward(self, source: torch.Tensor, target: torch.Tensor, engine: str = "plain") -> torch.Tensor:
        cross_out = self.crossmodal_branch(source, target, engine)
        self_out = self.self_branch(target, engine)
        gate = self.gate(self_out, cross_out)
        mixed = gate * cross_out + (1 - gate) * self_out
        return mixed + self.feed_forward(mixed)


class PMRLayer(nn.Module):
    """One round of hub -> modality reinforcement and modality -> hub collection (six MRUs).

    `forward(hub, modalities, engine="plain")` with hub (T_C, B, d) and modalities a tuple (X_l, X_a, X_v)
    returns (new hub, new modalities, α (B, 3) in the order l, a, v).
    """

    def __init__(self, d_model: int, num_heads: int, attn_dropout: float, relu_dropout: float,
                 res_dropout: float, num_modalities: int = 3):
        super().__init__()

        def mru():
            return ModalityReinforcementUnit(d_model, num_heads, attn_dropout, relu_dropout, res_dropout)

        self.hub_to_modality = nn.ModuleList([mru() for _ in range(num_modalities)])
        self.modality_to_hub = nn.ModuleList([mru() for _ in range(num_modalities)])
        # μ_m = uᵀ tanh(W_m · mean_t(Z_m) + b_m): W_m, b_m per modality, u shared.
        self.message_proj = nn.ModuleList([_xavier_linear(d_model, d_model) for _ in range(num_modalities)])
        self.message_score = _xavier_linear(d_model, 1, bias=False)
        self.hub_feed_forward = FeedForward(d_model, relu_dropout, res_dropout)

    def forward(self, hub: torch.Tensor, modalities: tuple, engine: str = "plain"):
        # 1. The same (incoming) hub reinforces every modality.
        modalities = tuple(unit(hub, x, engine=engine) for unit, x in zip(self.hub_to_modality, modalities))
        # 2. Each reinforced modality proposes a candidate hub, all from the same incoming hub.
        candidates = [unit(x, hub, engine=engine) for unit, x in zip(self.modality_to_hub, modalities)]
        # 3. Score each candidate by its time-average (the design's choice: fixed d×d size at any length).
        scores = torch.cat([
            self.message_score(torch.tanh(proj(z.mean(dim=0))))
            for proj, z in zip(self.message_proj, candidates)
        ], dim=1)  # (B, M)
        weights = torch.softmax(scores, dim=1)
        combined = sum(weights[:, m].view(1, -1, 1) * z for m, z in enumerate(candidates))
        hub = combined + self.hub_feed_forward(combined)
        return hub, modalities, weights


class PMR(nn.Module):
    """PMR backbone; `forward(text, audio, vision)` returns `(logits (B, output_dim), h (B, d_model))`.

    `seq_lens` is accepted and ignored (the backbone contract): every part works at any length.
    `forward_with_details` returns the intermediate results too (hub, modalities, aggregation weights).
    `attn_mask` applies to the final encoder only; the MRUs attend without a mask. `engine` ("auto",
    "plain" or "fast") chooses how the final encoder and the attentions are computed (the module
    docstring); the result and the parameters are the same whichever runs.
    """

    def __init__(self, orig_dims, output_dim=1, seq_lens=None, kernel_sizes=(3, 5, 3), d_model=40,
                 num_heads=10, layers=5, attn_dropout=0.1, relu_dropout=0.1, res_dropout=0.1,
                 embed_dropout=0.25, out_dropout=0.0, attn_mask=True, engine="auto"):
        super().__init__()
        if layers < 1:
            raise ValueError(f"PMR needs at least one layer, got layers={layers}")
        resolve_engine(engine, "cpu")  # refuses an unknown name now rather than at the first forward
        self.engine = engine
        self.embed_dropout = embed_dropout
        self.out_dropout = out_dropout

        add_input_projections(self, orig_dims, d_model, kernel_sizes)

        self.layers = nn.ModuleList([
            PMRLayer(d_model, num_heads, attn_dropout, relu_dropout, res_dropout) for _ in range(layers)
        ])
        # MulT's encoder (docs/design.md § MulT), including its own input stage (√d scaling, positions, dropout)
        # on H, as every MulT encoder applies to its input.
        self.final_encoder = TransformerEncoder(d_model, num_heads, layers, attn_dropout=attn_dropout,
                                                relu_dropout=relu_dropout, res_dropout=res_dropout,
                                                embed_dropout=embed_dropout, attn_mask=attn_mask)
        self.proj1 = nn.Linear(d_model, d_model)
        self.proj2 = nn.Linear(d_model, d_model)
        self.out_layer = nn.Linear(d_model, output_dim)

    def _embed(self, features: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
        """(B, L, d_m) -> (T, B, d): temporal conv, then MulT's encoder input stage."""
        x = conv(features.transpose(1, 2)).permute(2, 0, 1)
        # Positions come from the conv output's channel 0, so a zeroed modality gets no position
        # signal, exactly as in MulT's encoders.
        return embed_input(x, self.embed_dropout, self.training)

    def forward_with_details(self, text, audio, vision) -> dict:
        """All outputs as a dict: `logits` (B, C), `hidden` h (B, d), `hub` (T_C, B, d),
        `modalities` (X_l, X_a, X_v) each (T_m, B, d) after the last layer, and `alphas` (B, layers, 3),
        each layer's aggregation weights in the order l, a, v."""
        modalities = tuple(self._embed(x, getattr(self, name))
                           for name, x in zip(PROJECTION_NAMES, (text, audio, vision)))
        hub = torch.cat(modalities, dim=0)
        engine = resolve_engine(self.engine, self.proj_l.weight.device)
        alphas = []
        for layer in self.layers:
            hub, modalities, weights = layer(hub, modalities, engine=engine)
            alphas.append(weights)
        x_l, x_a, x_v = modalities
        sequence = torch.cat([hub, x_l, x_v, x_a], dim=0)  # the design's order
        (hidden,) = run_encoders([self.final_encoder], [sequence], last_step=True, engine=engine)
        logits, _ = residual_head(hidden, self.proj1, self.proj2, self.out_layer, self.out_dropout, self.training)
        return {"logits": logits, "hidden": hidden, "hub": hub, "modalities": modalities,
                "alphas": torch.stack(alphas, dim=1)}

    def forward(self, text, audio, vision):
        details = self.forward_with_details(text, audio, vision)
        return details["logits"], details["hidden"]
