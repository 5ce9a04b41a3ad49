"""PMR backbone (docs/design.md § PMR) on tiny tensors: shapes, the MRU gate, message aggregation, cross-modality
flow, determinism, gradients, a learnable toy task, and PMR inside CausalMER."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from src.models import build_backbone
from src.models.pmr import PMR, ModalityReinforcementUnit

D_MODEL, HEADS = 8, 2

# Real feature sizes (text, audio, vision), MulT kernels and class counts per dataset.
DATASETS = {
    "iemocap": {"dims": (300, 74, 35), "kernels": (3, 5, 3), "classes": 8},
    "mosei_senti": {"dims": (300, 74, 35), "kernels": (1, 3, 3), "classes": 7},
    "mosi": {"dims": (300, 5, 20), "kernels": (1, 3, 3), "classes": 1},
}
ALIGNED, UNALIGNED = (9, 9, 9), (7, 12, 10)


def tiny_pmr(dims=(6, 5, 4), kernels=(1, 3, 3), output_dim=3, layers=2, dropout=0.0, **overrides):
    settings = dict(orig_dims=dims, output_dim=output_dim, kernel_sizes=kernels, d_model=D_MODEL,
                    num_heads=HEADS, layers=layers, attn_dropout=dropout, relu_dropout=dropout,
                    res_dropout=dropout, embed_dropout=dropout, out_dropout=dropout)
    settings.update(overrides)
    return PMR(**settings)


def random_inputs(dims, lengths, batch=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, length, dim, generator=generator) for length, dim in zip(lengths, dims)]


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("lengths", [ALIGNED, UNALIGNED], ids=["aligned", "unaligned"])
def test_shapes(dataset, lengths):
    spec = DATASETS[dataset]
    torch.manual_seed(0)
    model = build_backbone("pmr", orig_dims=spec["dims"], seq_lens=lengths, output_dim=spec["classes"],
                           kernel_sizes=spec["kernels"], d_model=D_MODEL, num_heads=HEADS, layers=1)
    text, audio, vision = random_inputs(spec["dims"], lengths, batch=2)
    logits, hidden = model(text, audio, vision)
    assert logits.shape == (2, spec["classes"])
    assert hidden.shape == (2, D_MODEL)

    details = model.forward_with_details(text, audio, vision)
    conv_lengths = [length - kernel + 1 for length, kernel in zip(lengths, spec["kernels"])]
    assert [x.shape for x in details["modalities"]] == [(t, 2, D_MODEL) for t in conv_lengths]
    assert details["hub"].shape == (sum(conv_lengths), 2, D_MODEL)
    assert details["alphas"].shape == (2, 1, 3)
    assert torch.isfinite(logits).all()


def test_final_encoder_sees_hub_then_text_vision_audio():
    """H = [C; X_l; X_v; X_a]: feeding that concatenation to the final encoder reproduces h."""
    torch.manual_seed(0)
    model = tiny_pmr().eval()
    inputs = random_inputs((6, 5, 4), UNALIGNED)
    with torch.no_grad():
        details = model.forward_with_details(*inputs)
        x_l, x_a, x_v = details["modalities"]
        encoded = model.final_encoder(torch.cat([details["hub"], x_l, x_v, x_a], dim=0))
    # to float rounding: the default engine computes the final encoder in its rearranged form
    torch.testing.assert_close(encoded[-1], details["hidden"], rtol=0, atol=1e-5)


@torch.no_grad()
def test_input_stage_scales_adds_positions_and_treats_zero_channel_as_padding():
    torch.manual_seed(0)
    model = tiny_pmr().eval()
    vision = random_inputs((6, 5, 4), UNALIGNED)[2]
    conv = model.proj_v(vision.transpose(1, 2)).permute(2, 0, 1)  # (T, B, d)
    length = conv.shape[0]
    position = torch.arange(1, length + 1, dtype=torch.float32).unsqueeze(1)
    frequency = torch.exp(torch.arange(D_MODEL // 2) * -(torch.log(torch.tensor(10000.0)) / (D_MODEL // 2 - 1)))
    table = torch.cat([torch.sin(position * frequency), torch.cos(position * frequency)], dim=1)
    expected = D_MODEL ** 0.5 * conv + table.unsqueeze(1)
    torch.testing.assert_close(model._embed(vision, model.proj_v), expected, rtol=1e-5, atol=1e-5)
    # A zeroed modality has channel 0 exactly 0 everywhere: every step is padding, no positions.
    assert torch.equal(model._embed(torch.zeros_like(vision), model.proj_v), torch.zeros_like(conv))


# --- the Modality Reinforcement Unit --------------------------------------------------------------

def mru_and_inputs():
    torch.manual_seed(1)
    unit = ModalityReinforcementUnit(D_MODEL, HEADS, attn_dropout=0.0, relu_dropout=0.0, res_dropout=0.0).eval()
    generator = torch.Generator().manual_seed(2)
    source = torch.randn(11, 3, D_MODEL, generator=generator)
    target = torch.randn(5, 3, D_MODEL, generator=generator)
    return unit, source, target


def branches_by_hand(unit, source, target):
    """c and a computed from the unit's submodules directly, not through its own branch methods."""
    query, key_value = unit.cross_norm(target), unit.cross_norm(source)
    cross_out = target + unit.cross_attn(query, key_value, key_value)
    normed = unit.self_norm(target)
    self_out = target + unit.self_attn(normed, normed, normed)
    return cross_out, self_out


def feed_forward_by_hand(unit, y):
    block = unit.feed_forward
    return y + block.fc2(F.relu(block.fc1(block.norm(y))))


@torch.no_grad()
@pytest.mark.parametrize("fixed_gate", [1.0, 0.0])
def test_gate_one_is_the_crossmodal_path_and_zero_the_self_path(fixed_gate, monkeypatch):
    unit, source, target = mru_and_inputs()
    cross_out, self_out = branches_by_hand(unit, source, target)
    assert not torch.allclose(cross_out, self_out)  # otherwise the test could not tell them apart
    # The learned gate replaced by a constant: G = 1 keeps only c, G = 0 only a.
    monkeypatch.setattr(unit, "gate", lambda self_branch, cross_branch: torch.full_like(cross_branch, fixed_gate))
    expected = cross_out if fixed_gate == 1.0 else self_out
    torch.testing.assert_close(unit(source, target), feed_forward_by_hand(unit, expected), rtol=0, atol=0)


@torch.no_grad()
def test_learned_gate_interpolates_between_the_branches():
    unit, source, target = mru_and_inputs()
    cross_out, self_out = branches_by_hand(unit, source, target)
    gate = torch.sigmoid(self_out @ unit.gate_self.weight.T + unit.gate_self.bias + cross_out @ unit.gate_cross.weight.T)
    assert ((gate > 0) & (gate < 1)).all() and gate.std() > 0.01  # a real, non-constant mixture
    expected = feed_forward_by_hand(unit, gate * cross_out + (1 - gate) * self_out)
    torch.testing.assert_close(unit(source, target), expected, rtol=1e-5, atol=1e-6)


def test_gate_parameters_are_identifiable():
    unit, _, _ = mru_and_inputs()
    assert unit.gate_self.weight.shape == (D_MODEL, D_MODEL) and unit.gate_self.bias.shape == (D_MODEL,)
    assert unit.gate_cross.weight.shape == (D_MODEL, D_MODEL) and unit.gate_cross.bias is None
    assert unit.cross_attn is not unit.self_attn and unit.cross_norm is not unit.self_norm


# --- the PMR layer and the full model ----------------------------------------------------------------

@torch.no_grad()
def test_aggregation_weights_are_a_distribution_per_sample():
    torch.manual_seed(0)
    model = tiny_pmr(layers=2).eval()
    alphas = model.forward_with_details(*random_inputs((6, 5, 4), UNALIGNED, batch=4))["alphas"]
    assert alphas.shape == (4, 2, 3)
    assert (alphas > 0).all()
    torch.testing.assert_close(alphas.sum(dim=-1), torch.ones(4, 2))
    assert alphas[0, 0].std() > 0  # the weights are not trivially uniform


@torch.no_grad()
def test_after_one_layer_every_modality_depends_on_every_input():
    torch.manual_seed(0)
    model = tiny_pmr(layers=1).eval()
    inputs = random_inputs((6, 5, 4), UNALIGNED)
    base = model.forward_with_details(*inputs)["modalities"]
    for perturbed in range(3):
        changed = [x.clone() for x in inputs]
        changed[perturbed] = changed[perturbed] + 0.5 * torch.randn_like(changed[perturbed])
        outputs = model.forward_with_details(*changed)["modalities"]
        for name, before, after in zip("lav", base, outputs):
            assert (before - after).abs().max() > 1e-4, f"X_{name} ignores input {'lav'[perturbed]}"


def test_eval_is_deterministic_and_train_mode_uses_dropout():
    torch.manual_seed(0)
    model = tiny_pmr(dropout=0.2)
    inputs = random_inputs((6, 5, 4), UNALIGNED)
    model.eval()
    with torch.no_grad():
        first, second = model(*inputs)[0], model(*inputs)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(*inputs)[0], model(*inputs)[0])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = tiny_pmr(layers=2, dropout=0.1).train()
    logits, _ = model(*random_inputs((6, 5, 4), UNALIGNED))
    F.cross_entropy(logits, torch.tensor([0, 1, 2])).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_rejects_zero_layers():
    with pytest.raises(ValueError, match="at least one layer"):
        tiny_pmr(layers=0)


def test_learns_a_label_carried_by_one_modality():
    """The class is planted in the audio features only; text and vision are noise."""
    classes, lengths, dims = 3, (5, 6, 4), (6, 5, 4)

    def make_split(count, seed):
        generator = torch.Generator().manual_seed(seed)
        text, audio, vision = random_inputs(dims, lengths, batch=count, seed=seed)
        labels = torch.randint(0, classes, (count,), generator=generator)
        audio[:, :, :classes] += 1.5 * F.one_hot(labels, classes).unsqueeze(1)
        return (text, audio, vision), labels

    train_inputs, train_labels = make_split(60, seed=10)
    test_inputs, test_labels = make_split(60, seed=11)
    torch.manual_seed(0)
    model = tiny_pmr(dims=dims, output_dim=classes, layers=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        F.cross_entropy(model(*train_inputs)[0], train_labels).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(*test_inputs)[0].argmax(dim=1) == test_labels).float().mean().item()
    assert accuracy > 0.7, f"held-out accuracy {accuracy:.2f} (chance 0.33)"


# --- inside the CausalMER wrapper ---------------------------------------------------------------

class MeanPoolBranch(nn.Module):
    """A minimal unimodal branch: mean over time, then one Linear."""

    def __init__(self, in_dim, output_dim):
        super().__init__()
        self.out = nn.Linear(in_dim, output_dim)

    def forward(self, x):
        return self.out(x.mean(dim=1))


def test_inside_causalmer():
    try:
        from src.causal import CausalHead, CausalMER
    except ImportError as error:  # the wrapper lives in another package of the project
        pytest.skip(f"src.causal is not importable: {error}")
    dims, emotions = (6, 5, 4), 4
    torch.manual_seed(0)
    backbone = tiny_pmr(dims=dims, output_dim=2 * emotions, kernels=(3, 5, 3), layers=1)
    branches = [MeanPoolBranch(dim, 2 * emotions) for dim in dims]
    model = CausalMER(backbone, *branches, CausalHead())
    inputs = random_inputs(dims, UNALIGNED)
    target = torch.randint(0, 2, (3, emotions), generator=torch.Generator().manual_seed(3))
    out = model(*inputs)
    assert out["logits_tie"].shape == out["logits_m"].shape == (3, 2 * emotions)
    assert out["extras"] == {}  # PMR returns (logits, hidden): no auxiliary outputs
    loss = model.loss(out, target)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in backbone.parameters())


def test_fast_and_plain_engines_agree_in_values_and_gradients():
    results = []
    for engine in ("plain", "fast"):
        torch.manual_seed(0)
        model = tiny_pmr(engine=engine).train()  # every dropout 0
        logits, hidden = model(*random_inputs((6, 5, 4), UNALIGNED))
        (logits.square().sum() + hidden.sum()).backward()
        results.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-5)
    for name, grad in results[0][1].items():
        assert torch.allclose(grad, results[1][1][name], atol=1e-4), name

