"""MulT, the Multimodal Transformer backbone, as modified for CausalMER (SPEC §2).

text/audio/vision (B, L_m, d_m)
  -> Conv1d per modality (kernel k_m, no bias) to d_model          (text: embedding dropout first)
  -> six crossmodal encoders, target <- source: l<-a, l<-v, a<-l, a<-v, v<-l, v<-a
  -> per target, concatenate its two crossmodal outputs (2·d_model) -> memory encoder
  -> last time step of each memory encoder, concatenated l, a, v   = last_hs (B, 6·d_model)
  -> residual head proj1/proj2 -> out_layer                         = logits (B, output_dim)

state_dict keys are the reference's, so its state_dicts load with `load_state_dict` (strict). The
encoders' weights are held stacked, per group of same-shaped encoders (src/models/encoder_stack.py).
"""
import torch
import torch.nn.functional as F
from torch import nn

from src.models.encoder import dropout
from src.models.encoder_stack import EncoderStack, register_member_names

# The reference builds every encoder with 10 heads whatever its config says.
REFERENCE_NUM_HEADS = 10

# MulT's crossmodal encoders (target <- source: trans_l_with_a is l <- a) and memory encoders, under
# the reference's names so that its state_dicts load. DMD's heterogeneous branch reuses them.
CROSSMODAL_NAMES = ("trans_l_with_a", "trans_l_with_v", "trans_a_with_l",
                    "trans_a_with_v", "trans_v_with_l", "trans_v_with_a")
MEMORY_NAMES = ("trans_l_mem", "trans_a_mem", "trans_v_mem")


def add_crossmodal_encoders(module: nn.Module, d_model: int, num_heads: int, layers: int, attn_dropout: float,
                            attn_dropout_a: float, attn_dropout_v: float, **shared) -> None:
    """Give `module` the six crossmodal encoders (`layers` deep) as the stack `module.crossmodal`,
    and the three memory encoders (width 2·d_model, max(layers, 3) deep) as `module.memory`.
    `shared` holds the other `EncoderStack` options (relu/res/embed dropout, attn_mask).

    Crossmodal attention dropout follows the *source* modality (l <- a uses the audio dropout);
    memory encoders use `attn_dropout`. state_dicts name every encoder as the reference does.
    """
    by_source = {"l": attn_dropout, "a": attn_dropout_a, "v": attn_dropout_v}
    module.crossmodal = EncoderStack(CROSSMODAL_NAMES, d_model, num_heads, layers,
                                     [by_source[name[-1]] for name in CROSSMODAL_NAMES], **shared)
    module.memory = EncoderStack(MEMORY_NAMES, 2 * d_model, num_heads, max(layers, 3),
                                 [attn_dropout] * len(MEMORY_NAMES), **shared)
    register_member_names(module)


def crossmodal_memories(module: nn.Module, x_l, x_a, x_v, group: bool = True):
    """(T_m, B, d) projections -> the last time step of the three memory encoders, (B, 2d) each,
    order l, a, v: all that MulT (and DMD) read of them.

    Each target attends to the two other modalities; its two crossmodal outputs are concatenated
    and read by its memory encoder.
    """
    l_a, l_v, a_l, a_v, v_l, v_a = module.crossmodal([x_l, x_l, x_a, x_a, x_v, x_v],
                                                     [x_a, x_v, x_l, x_v, x_l, x_a], group=group)
    return module.memory([torch.cat([l_a, l_v], dim=2), torch.cat([a_l, a_v], dim=2),
                          torch.cat([v_l, v_a], dim=2)], group=group, last_step=True)


class MulT(nn.Module):
    """Returns `(logits, last_hs)` from `forward(text, audio, vision)`.

    `num_heads` is accepted for config compatibility but, as in the reference, ignored (10 heads)
    unless `use_configured_heads=True`. `seq_lens` is accepted and ignored (the backbone contract):
    MulT works at any length. The encoders live in two `EncoderStack`s (`crossmodal`, `memory`);
    `group_encoders` runs each stack as a single batched computation when its members' lengths are
    similar (same results; a speed option).
    """

    def __init__(self, orig_dims, kernel_sizes=(3, 5, 3), d_model=40, num_heads=10, layers=5,
                 attn_dropout=0.1, attn_dropout_a=0.0, attn_dropout_v=0.0, relu_dropout=0.1,
                 res_dropout=0.1, embed_dropout=0.25, out_dropout=0.0, attn_mask=True, output_dim=1,
                 seq_lens=None, use_configured_heads=False, group_encoders=True):
        super().__init__()
        d_text, d_audio, d_vision = orig_dims
        k_text, k_audio, k_vision = kernel_sizes
        self.d_model = d_model
        self.embed_dropout = embed_dropout
        self.out_dropout = out_dropout
        self.group_encoders = group_encoders
        heads = num_heads if use_configured_heads else REFERENCE_NUM_HEADS

        self.proj_l = nn.Conv1d(d_text, d_model, kernel_size=k_text, padding=0, bias=False)
        self.proj_a = nn.Conv1d(d_audio, d_model, kernel_size=k_audio, padding=0, bias=False)
        self.proj_v = nn.Conv1d(d_vision, d_model, kernel_size=k_vision, padding=0, bias=False)

        add_crossmodal_encoders(self, d_model, heads, layers, attn_dropout, attn_dropout_a, attn_dropout_v,
                                relu_dropout=relu_dropout, res_dropout=res_dropout, embed_dropout=embed_dropout,
                                attn_mask=attn_mask)

        combined_dim = 6 * d_model
        self.proj1 = nn.Linear(combined_dim, combined_dim)
        self.proj2 = nn.Linear(combined_dim, combined_dim)
        self.out_layer = nn.Linear(combined_dim, output_dim)

    def forward(self, text, audio, vision):
        """text/audio/vision (B, L_m, d_m) -> (logits (B, output_dim), last_hs (B, 6·d_model))."""
        text = dropout(text, self.embed_dropout, self.training)
        # Conv1d wants (B, d, L); the encoders want (T, B, E).
        x_l = self.proj_l(text.transpose(1, 2)).permute(2, 0, 1)
        x_a = self.proj_a(audio.transpose(1, 2)).permute(2, 0, 1)
        x_v = self.proj_v(vision.transpose(1, 2)).permute(2, 0, 1)

        memories = crossmodal_memories(self, x_l, x_a, x_v, self.group_encoders)
        last_hs = torch.cat(memories, dim=1)
        hidden = self.proj2(dropout(F.relu(self.proj1(last_hs)), self.out_dropout, self.training))
        logits = self.out_layer(hidden + last_hs)
        return logits, last_hs
