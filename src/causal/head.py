"""The CF-VQA-style causal head: fuse backbone and branch logits, and measure the branches' direct effects.

Inputs are all logits of shape (B, C): z_m from the backbone (the multimodal path) and z_t, z_a, z_v from
the unimodal branches (the shortcut paths a biased model leans on). The head fuses them with one of four
fusions h and compares the factual outcome with counterfactual ones, in which an input is replaced by a
learnable scalar "no-treatment" constant:

    Y_all = h(z_m, z_t, z_a, z_v)
    Y_t   = h(c_t, z_t, c_t, c_t)      only the text shortcut is real
    Y_a   = h(c_a, c_a, z_a, c_a)      only the audio shortcut is real
    Y_v   = h(c_v, c_v, c_v, z_v)      only the vision shortcut is real
    Y_0   = h(c*,  c*,  c*,  c*)       nothing is real, c* = c_t + c_a + c_v

    TE = Y_all - Y_0,  NDE_k = Y_k - Y_0,  NDE = NDE_t + NDE_a + NDE_v,
    TIE = TE - NDE = Y_all - Y_t - Y_a - Y_v + 2 Y_0      (the debiased prediction)

Gradient routing is part of the method, not an implementation detail:
- logits_te = Y_all trains the backbone and branches (the constants take no part in it);
- logits_tie uses detached constants, so predicting never moves them;
- te and nde_* use detached logits and live constants: the KL term in the loss trains only the constants.

With the tanh fusion every Y_k - Y_0 is tanh(z_k) plus a per-sample shift that depends only on the
constants; the loss compares softmaxes, which ignore shifts, so under tanh the constants never learn.
"""
import torch
import torch.nn as nn

from ..errors import ConfigError

EPS = 1e-12


def _fuse_mask(z_m, z_t, z_a, z_v):
    return z_m * torch.sigmoid(z_t + z_a + z_v)


def _fuse_sum(z_m, z_t, z_a, z_v):
    return torch.log(torch.sigmoid(z_m + z_t + z_a + z_v) + EPS)


def _fuse_hm(z_m, z_t, z_a, z_v):
    # Harmonic-style fusion: log(P / (1 + P)) of the product of the four probabilities.
    product = torch.sigmoid(z_m) * torch.sigmoid(z_t) * torch.sigmoid(z_a) * torch.sigmoid(z_v)
    return torch.log(product + EPS) - torch.log1p(product)


def _fuse_tanh(z_m, z_t, z_a, z_v):
    return z_m + torch.tanh(z_t) + torch.tanh(z_a) + torch.tanh(z_v)


FUSIONS = {
    "mask": _fuse_mask,
    "sum": _fuse_sum,
    "hm": _fuse_hm,
    "tanh": _fuse_tanh,
}


def check_fusion(name: str) -> str:
    """Return name if it is a known fusion, else raise ConfigError listing the valid ones."""
    if name not in FUSIONS:
        raise ConfigError(f"unknown fusion '{name}'; valid fusions: {', '.join(FUSIONS)}")
    return name


class CausalHead(nn.Module):
    """Fuses (z_m, z_t, z_a, z_v) and returns the factual, debiased and counterfactual quantities."""

    def __init__(self, fusion: str = "mask", constant: float = 0.0):
        super().__init__()
        self.fusion = check_fusion(fusion)
        self.fuse = FUSIONS[fusion]
        # One scalar per modality: the value its logits take when that modality is "not given".
        self.constant_t = nn.Parameter(torch.tensor(float(constant)))
        self.constant_a = nn.Parameter(torch.tensor(float(constant)))
        self.constant_v = nn.Parameter(torch.tensor(float(constant)))

    def _outcomes(self, z_m, z_t, z_a, z_v, c_t, c_a, c_v):
        """Y_all, Y_t, Y_a, Y_v, Y_0 for the given logits and constants.

        Constants are broadcast to the logits' full shape before fusing, so each counterfactual input
        passes through the same σ / tanh as a real one would.
        """
        def filled(c):
            return c.expand_as(z_m)

        c_0 = c_t + c_a + c_v
        y_all = self.fuse(z_m, z_t, z_a, z_v)
        y_t = self.fuse(filled(c_t), z_t, filled(c_t), filled(c_t))
        y_a = self.fuse(filled(c_a), filled(c_a), z_a, filled(c_a))
        y_v = self.fuse(filled(c_v), filled(c_v), filled(c_v), z_v)
        y_0 = self.fuse(filled(c_0), filled(c_0), filled(c_0), filled(c_0))
        return y_all, y_t, y_a, y_v, y_0

    def forward(self, z_m, z_t, z_a, z_v):
        # The fusions broadcast, so a (B, 1) input against (B, C) ones would fuse silently into nonsense.
        shapes = [tuple(z.shape) for z in (z_m, z_t, z_a, z_v)]
        if len(set(shapes)) != 1 or len(shapes[0]) != 2:
            raise ValueError(f"z_m, z_t, z_a, z_v must all be (batch, classes) of one shape; got {shapes}")

        constants = (self.constant_t, self.constant_a, self.constant_v)

        # The prediction: constants frozen, gradients flow to the backbone and branches only.
        y_all, y_t, y_a, y_v, y_0 = self._outcomes(z_m, z_t, z_a, z_v, *(c.detach() for c in constants))
        logits_tie = y_all - y_t - y_a - y_v + 2 * y_0

        # The effects the KL term compares: logits frozen, gradients flow to the constants only.
        frozen = (z.detach() for z in (z_m, z_t, z_a, z_v))
        f_all, f_t, f_a, f_v, f_0 = self._outcomes(*frozen, *constants)
        nde_t, nde_a, nde_v = f_t - f_0, f_a - f_0, f_v - f_0

        return {
            "logits_tie": logits_tie,
            "logits_te": y_all,
            "te": f_all - f_0,
            "nde": nde_t + nde_a + nde_v,
            "nde_t": nde_t,
            "nde_a": nde_a,
            "nde_v": nde_v,
            "logits_m": z_m,
            "logits_t": z_t,
            "logits_a": z_a,
            "logits_v": z_v,
        }
