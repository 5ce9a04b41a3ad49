"""MulT backbone: the reference fixture, parameter names, other datasets' shapes, training behaviour."""
import pytest
import torch

from src.models import build_backbone
from src.models.encoder import sinusoidal_positions
from src.models.mult import MulT

WEIGHTLESS_SUFFIXES = (".version", ".embed_positions._float_tensor")


def tiny_config(**overrides):
    config = dict(orig_dims=(300, 74, 35), kernel_sizes=(3, 5, 3), d_model=20, num_heads=10, layers=1,
                  attn_dropout=0.2, attn_dropout_a=0.1, attn_dropout_v=0.05, relu_dropout=0.1,
                  res_dropout=0.1, embed_dropout=0.25, out_dropout=0.1, attn_mask=True, output_dim=8)
    config.update(overrides)
    return config


def inputs(batch, lengths, dims, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, length, dim, generator=generator) for length, dim in zip(lengths, dims)]


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    return torch.load(fixtures_dir / "mult_iemocap_aligned.pt", weights_only=True)


def test_reference_fixture_logits_and_hidden(reference):
    model = MulT(**reference["config"])
    model.load_state_dict(reference["state_dict"])  # strict; weightless buffers are skipped
    model.eval()
    with torch.no_grad():
        logits, last_hs = model(**reference["inputs"])
    assert torch.allclose(logits, reference["logits"], atol=1e-5, rtol=0)
    assert torch.allclose(last_hs, reference["last_hs"], atol=1e-5, rtol=0)


def test_parameter_names_equal_the_reference(reference):
    model = MulT(**reference["config"])
    expected = {k for k in reference["state_dict"] if not k.endswith(WEIGHTLESS_SUFFIXES)}
    assert set(model.state_dict()) == expected
    for name, tensor in model.state_dict().items():
        assert tensor.shape == reference["state_dict"][name].shape, name


def test_missing_or_unexpected_parameters_still_fail(reference):
    model = MulT(**reference["config"])
    state = dict(reference["state_dict"])
    state.pop("trans_l_mem.layers.0.fc1.weight")
    with pytest.raises(RuntimeError, match="trans_l_mem.layers.0.fc1.weight"):
        model.load_state_dict(state)
    state = dict(reference["state_dict"])
    state["trans_l_mem.layers.0.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="extra"):
        model.load_state_dict(state)


def test_built_through_registry_with_seq_lens(reference):
    model = build_backbone("mult", seq_lens=(20, 20, 20), **reference["config"])
    assert isinstance(model, MulT)


@pytest.mark.parametrize("dims,kernels,lengths,layers,attn_mask,output_dim", [
    ((300, 74, 35), (3, 5, 3), (8, 30, 40), 1, True, 8),    # IEMOCAP, unaligned lengths
    ((300, 74, 35), (1, 3, 3), (6, 12, 12), 2, False, 7),   # MOSEI, cls
    ((300, 5, 20), (1, 3, 3), (6, 25, 30), 1, True, 1),     # MOSI unaligned, regression
])
def test_shapes_and_eval_determinism(dims, kernels, lengths, layers, attn_mask, output_dim):
    torch.manual_seed(0)
    model = MulT(**tiny_config(orig_dims=dims, kernel_sizes=kernels, layers=layers, attn_mask=attn_mask,
                               output_dim=output_dim)).eval()
    x = inputs(3, lengths, dims)
    logits, last_hs = model(*x)
    assert logits.shape == (3, output_dim)
    assert last_hs.shape == (3, 6 * 20)
    again, _ = model(*x)
    assert torch.equal(logits, again)


def test_structure_follows_the_spec():
    model = MulT(**tiny_config(layers=2))
    source_dropout = {"l": 0.2, "a": 0.1, "v": 0.05}
    assert model.crossmodal.names == ("trans_l_with_a", "trans_l_with_v", "trans_a_with_l",
                                      "trans_a_with_v", "trans_v_with_l", "trans_v_with_a")
    assert model.crossmodal.depth == 2 and model.crossmodal.embed_dim == 20
    for target, source in [("l", "a"), ("l", "v"), ("a", "l"), ("a", "v"), ("v", "l"), ("v", "a")]:
        assert model.crossmodal.attn_dropout(f"trans_{target}_with_{source}") == source_dropout[source]
    assert model.memory.names == ("trans_l_mem", "trans_a_mem", "trans_v_mem")
    assert model.memory.depth == 3  # max(layers, 3)
    assert model.memory.embed_dim == 40
    assert all(model.memory.attn_dropout(f"trans_{m}_mem") == 0.2 for m in "lav")
    assert model.proj_l.bias is None and model.proj_a.kernel_size == (5,)


def test_num_heads_is_ten_unless_configured_heads_are_asked_for():
    assert MulT(**tiny_config(num_heads=4)).crossmodal.num_heads == 10
    honoured = MulT(**tiny_config(num_heads=4), use_configured_heads=True)
    assert honoured.crossmodal.num_heads == 4 and honoured.memory.num_heads == 4


def test_train_mode_dropout_changes_output_and_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = MulT(**tiny_config()).train()
    x = inputs(4, (10, 12, 12), (300, 74, 35))
    first, _ = model(*x)
    second, _ = model(*x)
    assert not torch.allclose(first, second)
    second.square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_zeroed_modality_has_no_position_signal_and_output_stays_finite():
    torch.manual_seed(0)
    model = MulT(**tiny_config()).eval()
    text, audio, vision = inputs(2, (8, 10, 10), (300, 74, 35))
    audio = torch.zeros_like(audio)
    projected = model.proj_a(audio.transpose(1, 2)).permute(2, 0, 1)
    assert torch.all(sinusoidal_positions(projected) == 0)
    logits, last_hs = model(text, audio, vision)
    assert torch.isfinite(logits).all() and torch.isfinite(last_hs).all()


def test_bf16_autocast_on_cpu_trains():
    torch.manual_seed(0)
    model = MulT(**tiny_config())
    x = inputs(2, (8, 10, 10), (300, 74, 35))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(*x)
    assert logits.shape == (2, 8) and torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert torch.isfinite(model.proj_l.weight.grad).all()


def test_grouped_and_separate_encoders_agree_in_values_and_gradients():
    torch.manual_seed(0)
    grouped = MulT(**tiny_config(layers=2), group_encoders=True).eval()
    separate = MulT(**tiny_config(layers=2), group_encoders=False).eval()
    separate.load_state_dict(grouped.state_dict())
    x = inputs(3, (10, 12, 10), (300, 74, 35))
    outputs = []
    for model in (grouped, separate):
        logits, last_hs = model(*x)
        (logits.square().sum() + last_hs.sum()).backward()
        outputs.append((logits, {n: p.grad for n, p in model.named_parameters()}))
    assert torch.allclose(outputs[0][0], outputs[1][0], atol=1e-5)
    for name, grad in outputs[0][1].items():
        assert torch.allclose(grad, outputs[1][1][name], atol=1e-4), name


def test_aligned_lengths_use_the_grouped_path(monkeypatch):
    import src.models.encoder_stack as stack_module

    calls = []
    original = stack_module._run
    monkeypatch.setattr(stack_module, "_run", lambda *a, **k: calls.append(len(a[3])) or original(*a, **k))
    MulT(**tiny_config()).eval()(*inputs(2, (10, 10, 10), (300, 74, 35)))
    assert calls == [6, 3]
    calls.clear()
    MulT(**tiny_config()).eval()(*inputs(2, (8, 60, 80), (300, 74, 35)))  # unaligned: each alone
    assert calls == [1] * 9
