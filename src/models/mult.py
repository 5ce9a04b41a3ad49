"""MulT, the Multimodal Transformer backbone, as modified for CausalMER (docs/design.md § MulT).

text/audio/vision (B, L_m, d_m)
  -> Conv1d per modality (kernel k_m, no bias) to d_model          (text: embedding dropout first)
  -> six crossmodal encoders, target <- source: l<-a, l<-v, a<-l, a<-v, v<-l, v<-a
  -> per target, concatenate its two crossmodal outputs (2·d_model) -> memory encoder
  -> last time step of each memory encoder, concatenated l, a, v   = last_hs (B, 6·d_model)
  -> residual head proj1/proj2 -> out_layer                         = logits (B, output_dim)

The nine encoders are plain `TransformerEncoder`s (src/models/encoder.py) under the reference's
names, so its state_dicts load with `load_state_dict` (strict). `run_encoders` computes a list of
them: with engine "plain" it calls each one's forward; "fast" computes the same from their
parameters in batched form (src/models/engine.py).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .encoder import TransformerEncoder
from .engine import resolve_engine, run_encoders
from .heads import residual_head
from .projections import add_input_projections, project_inputs

# The reference builds every encoder with 10 heads whatever its config says.
REFERENCE_NUM_HEADS = 10

# MulT's crossmodal encoders (target <- source: trans_l_with_a is l <- a) and memory encoders, under
# the reference's names so that its state_dicts load. DMD's heterogeneous branch reuses them.
CROSSMODAL_NAMES = ("trans_l_with_a", "trans_l_with_v", "trans_a_with_l",
                    "trans_a_with_v", "trans_v_with_l", "trans_v_with_a")
MEMORY_NAMES = ("trans_l_mem", "trans_a_mem", "trans_v_mem")


def add_crossmodal_encoders(module: nn.Module, d_model: int, num_heads: int, layers: int, attn_dropout: float,
                            attn_dropout_a: float, attn_dropout_v: float, **shared) -> None:
    """Give `module` the six crossmodal encoders (`layers` deep) and the three memory encoders
    (width 2·d_model, max(layers, 3) deep) as attributes named as in CROSSMODAL_NAMES and
    MEMORY_NAMES. `shared` holds the other `TransformerEncoder` options (relu/res/embed dropout,
    attn_mask).

    Crossmodal attention dropout follows the *source* modality (l <- a uses the audio dropout);
    memory encoders use `attn_dropout`. Built in the reference's order, so a seed gives its weights.
    """
    by_source = {"l": attn_dropout, "a": attn_dropout_a, "v": attn_dropout_v}
    for name in CROSSMODAL_NAMES:
        setattr(module, name, TransformerEncoder(d_model, num_heads, layers, attn_dropout=by_source[name[-1]],
                                                 **shared))
    for name in MEMORY_NAMES:
        setattr(module, name, TransformerEncoder(2 * d_model, num_heads, max(layers, 3), attn_dropout=attn_dropout,
                                                 **shared))


def crossmodal_memories(module: nn.Module, x_l, x_a, x_v, engine: str):
    """(T_m, B, d) projections -> the last time step of the three memory encoders, (B, 2d) each,
    order l, a, v: all that MulT (and DMD) read of them.

    Each target attends to the two other modalities (trans_l_with_a(x_l, x_a, x_a), ...); its two
    crossmodal outputs are concatenated and read by its memory encoder.
    """
    crossmodal = [getattr(module, name) for name in CROSSMODAL_NAMES]
    l_a, l_v, a_l, a_v, v_l, v_a = run_encoders(crossmodal, [x_l, x_l, x_a, x_a, x_v, x_v],
                                                [x_a, x_v, x_l, x_v, x_l, x_a], engine=engine)
    memory = [getattr(module, name) for name in MEMORY_NAMES]
    return run_encoders(memory, [torch.cat([l_a, l_v], dim=2), torch.cat([a_l, a_v], dim=2),
                                 torch.cat([v_l, v_a], dim=2)], last_step=True, engine=engine)


class MulT(nn.Module):
    """Returns `(logits, last_hs)` from `forward(text, audio, vision)`.

    `num_heads` is accepted for config compatibility but, as in the reference, ignored (10 heads)
    unless `use_configured_heads=True`. `seq_lens` is accepted and ignored (the backbone contract):
    MulT works at any length. `engine` ("auto", "plain" or "fast", src/models/engine.py) chooses how
    the encoders are computed; "auto" resolves by the device of the model's parameters at each
    forward. The result and the parameters are the same whichever runs.
    """

    def __init__(self, orig_dims, kernel_sizes=(3, 5, 3), d_model=40, num_heads=10, layers=5,
                 attn_dropout=0.1, attn_dropout_a=0.0, attn_dropout_v=0.0, relu_dropout=0.1,
                 res_dropout=0.1, embed_dropout=0.25, out_dropout=0.0, attn_mask=True, output_dim=1,
                 seq_lens=None, use_configured_heads=False, engine="auto"):
        super().__init__()
        resolve_engine(engine, "cpu")  # refuses an unknown name now rather than at the first forward
        self.engine = engine
        self.embed_dropout = embed_dropout
        self.out_dropout = out_dropout
        heads = num_heads if use_configured_heads else REFERENCE_NUM_HEADS
        if d_model % heads:
            raise ConfigError(f"mult: d_model {d_model} must be a multiple of the {heads} attention heads"
                              f"{'' if use_configured_heads else ' (MulT uses 10 unless use_configured_heads)'}")

        add_input_projections(self, orig_dims, d_model, kernel_sizes)
        add_crossmodal_encoders(self, d_model, heads, layers, attn_dropout, attn_dropout_a, attn_dropout_v,
                                relu_dropout=relu_dropout, res_dropout=res_dropout, embed_dropout=embed_dropout,
                                attn_mask=attn_mask)

        combined_dim = 6 * d_model
        self.proj1 = nn.Linear(combined_dim, combined_dim)
        self.proj2 = nn.Linear(combined_dim, combined_dim)
        self.out_layer = nn.Linear(combined_dim, output_dim)

    def forward(self, text, audio, vision):
        """text/audio/vision (B, L_m, d_m) -> (logits (B, output_dim), last_hs (B, 6·d_model))."""
        text = F.dropout(text, p=self.embed_dropout, training=self.training)
        # The projections give (B, d, T); the encoders want (T, B, E).
        x_l, x_a, x_v = (x.permute(2, 0, 1) for x in project_inputs(self, text, audio, vision))

        engine = resolve_engine(self.engine, self.proj_l.weight.device)
        last_hs = torch.cat(crossmodal_memories(self, x_l, x_a, x_v, engine), dim=1)
        logits, _ = residual_head(last_hs, self.proj1, self.proj2, self.out_layer, self.out_dropout, self.training)
        return logits, last_hs
