"""MulT backbone, for every engine: the reference fixture, parameter names, other datasets' shapes,
training behaviour; and the engines against each other on the whole model."""
import pytest
import torch

from src.models import build_backbone
from src.models.encoder import TransformerEncoder, sinusoidal_positions
from src.models.engine import ENGINES
from src.models.mult import CROSSMODAL_NAMES, MEMORY_NAMES, MulT

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


@pytest.fixture(params=ENGINES)
def engine(request):
    return request.param


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    return torch.load(fixtures_dir / "mult_iemocap_aligned.pt", weights_only=True)


def test_reference_fixture_logits_and_hidden(reference, engine):
    model = MulT(**reference["config"], engine=engine)
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
def test_shapes_and_eval_determinism(dims, kernels, lengths, layers, attn_mask, output_dim, engine):
    torch.manual_seed(0)
    model = MulT(**tiny_config(orig_dims=dims, kernel_sizes=kernels, layers=layers, attn_mask=attn_mask,
                               output_dim=output_dim), engine=engine).eval()
    x = inputs(3, lengths, dims)
    logits, last_hs = model(*x)
    assert logits.shape == (3, output_dim)
    assert last_hs.shape == (3, 6 * 20)
    again, _ = model(*x)
    assert torch.equal(logits, again)


def test_structure_follows_the_spec():
    model = MulT(**tiny_config(layers=2))
    source_dropout = {"l": 0.2, "a": 0.1, "v": 0.05}
    for name in CROSSMODAL_NAMES:  # trans_<target>_with_<source>
        encoder = getattr(model, name)
        assert isinstance(encoder, TransformerEncoder) and len(encoder.layers) == 2
        assert encoder.layer_norm.normalized_shape == (20,)
        assert all(layer.self_attn.attn_dropout == source_dropout[name[-1]] for layer in encoder.layers)
    for name in MEMORY_NAMES:
        encoder = getattr(model, name)
        assert len(encoder.layers) == 3  # max(layers, 3)
        assert encoder.layer_norm.normalized_shape == (40,)
        assert all(layer.self_attn.attn_dropout == 0.2 for layer in encoder.layers)
    assert model.proj_l.bias is None and model.proj_a.kernel_size == (5,)


def test_num_heads_is_ten_unless_configured_heads_are_asked_for():
    assert MulT(**tiny_config(num_heads=4)).trans_l_with_a.layers[0].self_attn.num_heads == 10
    honoured = MulT(**tiny_config(num_heads=4), use_configured_heads=True)
    assert honoured.trans_a_with_v.layers[0].self_attn.num_heads == 4
    assert honoured.trans_v_mem.layers[0].self_attn.num_heads == 4


def test_every_parameter_gets_a_finite_gradient_in_training(engine):
    torch.manual_seed(0)
    model = MulT(**tiny_config(), engine=engine).train()
    logits, _ = model(*inputs(4, (10, 12, 12), (300, 74, 35)))
    logits.square().sum().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
        assert parameter.grad.abs().sum() > 0, name


def test_input_and_head_dropout_follow_their_probabilities(engine):
    """p = 1 on the text input zeroes the projected text, whose channel-0 rule then drops its positions:
    the model computes exactly what it computes on zero text in eval mode. The head's dropout p = 1
    leaves logits = out_layer(proj2.bias + last_hs)."""
    torch.manual_seed(0)
    model = MulT(**tiny_config(embed_dropout=1.0, out_dropout=1.0, attn_dropout=0.0, attn_dropout_a=0.0,
                               attn_dropout_v=0.0, relu_dropout=0.0, res_dropout=0.0), engine=engine)
    text, audio, vision = inputs(3, (8, 10, 10), (300, 74, 35))
    # embed_dropout is also each encoder's: turned off there, only the input's dropout is tested
    for name in (*CROSSMODAL_NAMES, *MEMORY_NAMES):
        getattr(model, name).embed_dropout = 0.0
    logits, last_hs = model.train()(text, audio, vision)
    model.eval()
    with torch.no_grad():
        _, expected_hs = model(torch.zeros_like(text), audio, vision)
    assert torch.allclose(last_hs, expected_hs, atol=1e-5)
    assert torch.allclose(logits, model.out_layer(model.proj2.bias + last_hs), atol=1e-5)


def test_fast_and_plain_engines_agree_on_the_whole_model_in_values_and_gradients():
    """Eval outputs, and training-mode (dropout 0) gradients of every parameter, on aligned and
    unaligned lengths (the fast engine batches the first and runs the encoders alone on the second)."""
    zero = dict(attn_dropout=0.0, attn_dropout_a=0.0, attn_dropout_v=0.0, relu_dropout=0.0, res_dropout=0.0,
                embed_dropout=0.0, out_dropout=0.0)
    for lengths in ((10, 10, 10), (8, 40, 50)):
        results = []
        for engine in ("plain", "fast"):
            torch.manual_seed(0)
            model = MulT(**tiny_config(layers=2, **zero), engine=engine).train()
            logits, last_hs = model(*inputs(3, lengths, (300, 74, 35)))
            (logits.square().sum() + last_hs.sum()).backward()
            with torch.no_grad():
                eval_logits, _ = model.eval()(*inputs(3, lengths, (300, 74, 35), seed=1))
            results.append((logits, eval_logits, {n: p.grad for n, p in model.named_parameters()}))
        (plain_logits, plain_eval, plain_grads), (fast_logits, fast_eval, fast_grads) = results
        assert torch.allclose(plain_logits, fast_logits, atol=1e-5)
        assert torch.allclose(plain_eval, fast_eval, atol=1e-5)
        for name, grad in plain_grads.items():
            assert torch.allclose(grad, fast_grads[name], atol=1e-4), (lengths, name)


def test_zeroed_modality_has_no_position_signal_and_output_stays_finite(engine):
    torch.manual_seed(0)
    model = MulT(**tiny_config(), engine=engine).eval()
    text, audio, vision = inputs(2, (8, 10, 10), (300, 74, 35))
    audio = torch.zeros_like(audio)
    projected = model.proj_a(audio.transpose(1, 2)).permute(2, 0, 1)
    assert torch.all(sinusoidal_positions(projected) == 0)
    logits, last_hs = model(text, audio, vision)
    assert torch.isfinite(logits).all() and torch.isfinite(last_hs).all()


def test_bf16_autocast_on_cpu_trains(engine):
    torch.manual_seed(0)
    model = MulT(**tiny_config(), engine=engine)
    x = inputs(2, (8, 10, 10), (300, 74, 35))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = model(*x)
    assert logits.shape == (2, 8) and torch.isfinite(logits.float()).all()
    logits.float().sum().backward()
    assert torch.isfinite(model.proj_l.weight.grad).all()
