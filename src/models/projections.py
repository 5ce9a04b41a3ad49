"""The input projections MulT, PMR and DMD begin with: per modality, a Conv1d over time (kernel k_m, no
padding, no bias) from the feature width d_m to the model width d, so X_m has T_m = L_m - k_m + 1 steps.

They are attributes of the model itself under the reference's names (`proj_l`, `proj_a`, `proj_v`), so
reference state_dicts and this project's checkpoints keep their keys.
"""
from torch import nn

# The projection of text, audio and vision (src/modalities.py's order), in the order they are built.
PROJECTION_NAMES = ("proj_l", "proj_a", "proj_v")


def add_input_projections(module: nn.Module, orig_dims, d_model: int, kernel_sizes) -> None:
    """Give `module` the three projections; `orig_dims` and `kernel_sizes` in (text, audio, vision)
    order. Built in the reference's order, so a seed gives its weights."""
    for name, dim, kernel in zip(PROJECTION_NAMES, orig_dims, kernel_sizes, strict=True):
        setattr(module, name, nn.Conv1d(dim, d_model, kernel_size=kernel, padding=0, bias=False))


def project_inputs(module: nn.Module, text, audio, vision) -> tuple:
    """(B, L_m, d_m) each -> X_m (B, d, T_m) each, channels first as Conv1d computes them."""
    return tuple(getattr(module, name)(x.transpose(1, 2)) for name, x in zip(PROJECTION_NAMES, (text, audio, vision)))
