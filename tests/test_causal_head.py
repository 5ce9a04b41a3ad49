"""CausalHead: reference outputs, the counterfactual algebra, and its gradient routing."""
import math

import pytest
import torch

from src.causal import FUSIONS, CausalHead, check_fusion
from src.errors import ConfigError

OUTPUT_KEYS = ("logits_tie", "logits_te", "te", "nde", "nde_t", "nde_a", "nde_v")


def head_with_constants(fusion, c_t, c_a, c_v):
    head = CausalHead(fusion=fusion, constant=0.0)
    with torch.no_grad():
        head.constant_t.fill_(c_t)
        head.constant_a.fill_(c_a)
        head.constant_v.fill_(c_v)
    return head


def random_logits(batch, classes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, classes, generator=generator) for _ in range(4)]


@pytest.mark.parametrize("fusion", ["mask", "sum", "hm", "tanh"])
def test_outputs_match_reference_fixture(fixtures_dir, fusion):
    ref = torch.load(fixtures_dir / f"causal_{fusion}_iemocap.pt", weights_only=True)
    assert ref["fusion"] == fusion
    head = head_with_constants(fusion, *ref["constants"])
    z = ref["z"]
    out = head(z["m"], z["t"], z["a"], z["v"])
    for key in OUTPUT_KEYS:
        torch.testing.assert_close(out[key], ref["outputs"][key], atol=1e-5, rtol=0, msg=key)
    for name in "mtav":
        assert out[f"logits_{name}"] is z[name]


def test_constants_are_scalar_parameters_with_initial_value():
    head = CausalHead(constant=0.25)
    names = {name for name, _ in head.named_parameters()}
    assert names == {"constant_t", "constant_a", "constant_v"}
    for name in names:
        parameter = getattr(head, name)
        assert parameter.shape == () and parameter.item() == 0.25
    assert head.fusion == "mask"


# Plain-float versions of the four fusions for one logit: an independent check of substitution order.
def _sig(x):
    return 1.0 / (1.0 + math.exp(-x))


SCALAR_FUSIONS = {
    "mask": lambda m, t, a, v: m * _sig(t + a + v),
    "sum": lambda m, t, a, v: math.log(_sig(m + t + a + v) + 1e-12),
    "hm": lambda m, t, a, v: (lambda p: math.log(p + 1e-12) - math.log1p(p))(_sig(m) * _sig(t) * _sig(a) * _sig(v)),
    "tanh": lambda m, t, a, v: m + math.tanh(t) + math.tanh(a) + math.tanh(v),
}


@pytest.mark.parametrize("fusion", ["mask", "sum", "hm", "tanh"])
def test_hand_computed_counterfactuals(fusion):
    h = SCALAR_FUSIONS[fusion]
    c_t, c_a, c_v = 0.5, -0.3, 0.9
    c_0 = c_t + c_a + c_v
    zs = [[0.7, -1.2], [1.5, 0.1], [-0.4, 2.0], [0.3, -0.8]]  # z_m, z_t, z_a, z_v for one sample, two classes
    head = head_with_constants(fusion, c_t, c_a, c_v)
    out = head(*(torch.tensor([row]) for row in zs))

    for k in range(2):
        m, t, a, v = (row[k] for row in zs)
        y_all = h(m, t, a, v)
        y_t = h(c_t, t, c_t, c_t)
        y_a = h(c_a, c_a, a, c_a)
        y_v = h(c_v, c_v, c_v, v)
        y_0 = h(c_0, c_0, c_0, c_0)
        expected = {
            "logits_te": y_all,
            "te": y_all - y_0,
            "nde_t": y_t - y_0,
            "nde_a": y_a - y_0,
            "nde_v": y_v - y_0,
            "nde": y_t + y_a + y_v - 3 * y_0,
            "logits_tie": y_all - y_t - y_a - y_v + 2 * y_0,
        }
        for key, value in expected.items():
            assert out[key][0, k].item() == pytest.approx(value, abs=1e-5), (key, k)


def test_y0_uses_the_sum_of_the_constants():
    # With z_m = z_t = z_a = z_v = c* everywhere, Y_all equals Y_0 exactly, so TE is zero.
    c_t, c_a, c_v = 0.4, -0.1, 0.3
    for fusion in FUSIONS:
        head = head_with_constants(fusion, c_t, c_a, c_v)
        z = torch.full((3, 5), c_t + c_a + c_v)
        out = head(z, z, z, z)
        torch.testing.assert_close(out["te"], torch.zeros(3, 5), atol=1e-6, rtol=0)
        # ...and not with a single constant in its place.
        z_wrong = torch.full((3, 5), c_t)
        assert out["te"].abs().max() < head(z_wrong, z_wrong, z_wrong, z_wrong)["te"].abs().max()


@pytest.mark.parametrize("fusion", ["mask", "sum", "hm", "tanh"])
@pytest.mark.parametrize("batch,classes", [(1, 8), (5, 7), (3, 1)])
def test_tie_is_te_minus_nde(fusion, batch, classes):
    head = head_with_constants(fusion, 0.3, -0.2, 0.1)
    out = head(*random_logits(batch, classes, seed=batch))
    for key in OUTPUT_KEYS:
        assert out[key].shape == (batch, classes)
    torch.testing.assert_close(out["logits_tie"], out["te"] - out["nde"], atol=1e-5, rtol=0)
    torch.testing.assert_close(out["nde"], out["nde_t"] + out["nde_a"] + out["nde_v"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("fusion", ["mask", "sum", "hm", "tanh"])
def test_gradient_routing(fusion):
    head = head_with_constants(fusion, 0.3, -0.2, 0.1)
    z = [tensor.requires_grad_() for tensor in random_logits(4, 8, seed=1)]
    constants = [head.constant_t, head.constant_a, head.constant_v]
    out = head(*z)

    def grads(key, inputs):
        return torch.autograd.grad(out[key].sum(), inputs, retain_graph=True, allow_unused=True)

    # The prediction never moves the constants; it reaches every logit.
    assert all(g is None for g in grads("logits_tie", constants))
    assert all(g is not None for g in grads("logits_tie", z))
    assert all(g is None for g in grads("logits_te", constants))
    # The effects the KL compares reach the constants only.
    for key in ("te", "nde", "nde_t", "nde_a", "nde_v"):
        assert all(g is None for g in grads(key, z)), key
    assert all(g is not None for g in grads("nde", constants))


def test_shape_mismatch_is_rejected():
    head = CausalHead()
    z = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="one shape"):
        head(torch.zeros(2, 1), z, z, z)


def test_unknown_fusion_lists_valid_names():
    with pytest.raises(ConfigError) as error:
        CausalHead(fusion="product")
    for name in ("mask", "sum", "hm", "tanh"):
        assert name in str(error.value)
    with pytest.raises(ConfigError):
        check_fusion("Mask")
    assert check_fusion("hm") == "hm"
