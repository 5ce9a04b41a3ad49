"""The MulT encoder pieces: positions, the shifted future mask, attention, dropout, the encoder."""
import math

import pytest
import torch

from src.models import encoder as enc
from src.models.encoder import MultiheadAttention, TransformerEncoder, dropout, future_mask, sinusoidal_positions


def reference_position(p: int, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.tensor([math.exp(-i * math.log(10000) / (half - 1)) for i in range(half)])
    return torch.cat([torch.sin(p * freqs), torch.cos(p * freqs)])


def naive_attention(attn: MultiheadAttention, query, key, value, mask=None, keep=None):
    """The textbook computation with the packed weights, (T, B, E) in and out."""
    e, h = attn.embed_dim, attn.num_heads
    w, b = attn.in_proj_weight, attn.in_proj_bias
    q = query @ w[:e].T + b[:e]
    k = key @ w[e:2 * e].T + b[e:2 * e]
    v = value @ w[2 * e:].T + b[2 * e:]

    def heads(x):
        t, batch, _ = x.shape
        return x.reshape(t, batch * h, e // h).transpose(0, 1)

    scores = heads(q) @ heads(k).transpose(1, 2) / math.sqrt(e // h)
    if mask is not None:
        scores = scores + mask
    weights = torch.softmax(scores.float(), dim=-1)
    if keep is not None:
        weights = weights * keep
    out = (weights @ heads(v)).transpose(0, 1).reshape(query.shape[0], query.shape[1], e)
    return attn.out_proj(out)


def test_positions_follow_fairseq_table_and_zero_channel_rule():
    x = torch.randn(6, 3, 8)
    x[2, 1, 0] = 0.0  # one padded step in the middle of sample 1
    pos = sinusoidal_positions(x)
    assert pos.shape == (6, 3, 8)
    for t in range(6):
        assert torch.allclose(pos[t, 0], reference_position(t + 1, 8), atol=1e-6)
    assert torch.all(pos[2, 1] == 0)
    # the steps after a padded one keep their own index (no renumbering)
    assert torch.allclose(pos[3, 1], reference_position(4, 8), atol=1e-6)


def test_positions_of_zeroed_input_are_zero():
    assert torch.all(sinusoidal_positions(torch.zeros(5, 2, 10)) == 0)


def test_positions_odd_width_has_zero_last_column():
    pos = sinusoidal_positions(torch.ones(4, 1, 7))
    assert torch.all(pos[..., -1] == 0)


@pytest.mark.parametrize("t_q,t_k", [(4, 4), (3, 6), (6, 3)])
def test_future_mask_is_shifted_by_length_difference(t_q, t_k):
    mask = future_mask(t_q, t_k, torch.device("cpu"))
    shift = abs(t_k - t_q)
    for i in range(t_q):
        for j in range(t_k):
            expected = float("-inf") if j > i + shift else 0.0
            assert mask[i, j].item() == expected
    assert mask.shape == (t_q, t_k)
    assert future_mask(t_q, t_k, torch.device("cpu")) is mask  # cached


def test_attention_matches_naive_computation_with_mask():
    torch.manual_seed(0)
    attn = MultiheadAttention(20, 5).eval()
    nn_init_bias(attn)
    q, kv = torch.randn(4, 3, 20), torch.randn(7, 3, 20)
    mask = future_mask(4, 7, q.device)
    assert torch.allclose(attn(q, kv, kv, attn_mask=mask), naive_attention(attn, q, kv, kv, mask), atol=1e-5)
    assert torch.allclose(attn(q, q, q), naive_attention(attn, q, q, q), atol=1e-5)


def nn_init_bias(attn):
    # nonzero biases so the packed slicing of the bias is exercised too
    with torch.no_grad():
        attn.in_proj_bias.normal_()
        attn.out_proj.bias.normal_()


def test_attention_dropout_path_matches_naive_values_and_gradients():
    torch.manual_seed(0)
    attn = MultiheadAttention(12, 3, attn_dropout=0.3).train()
    nn_init_bias(attn)
    q = torch.randn(5, 2, 12, requires_grad=True)
    kv = torch.randn(8, 2, 12, requires_grad=True)
    mask = future_mask(5, 8, q.device)
    torch.manual_seed(7)
    out = attn(q, kv, kv, attn_mask=mask)
    grads = torch.autograd.grad(out.square().sum(), (q, kv, attn.in_proj_weight))
    torch.manual_seed(7)  # the same random draw gives the same dropout mask
    keep = enc._keep_scale(enc._random_lanes((2 * 3, 5, 8), q.device), 0.3)
    expected = naive_attention(attn, q, kv, kv, mask, keep)
    expected_grads = torch.autograd.grad(expected.square().sum(), (q, kv, attn.in_proj_weight))
    assert torch.allclose(out, expected, atol=1e-5)
    for got, want in zip(grads, expected_grads):
        assert torch.allclose(got, want, atol=1e-4)


def test_chunked_dropout_attention_equals_single_chunk(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 9, 5, requires_grad=True) for _ in range(3))
    mask = future_mask(9, 9, q.device)

    def run():
        torch.manual_seed(3)
        out = enc._DropoutAttention.apply(q, k, v, mask, 0.2, 0.5)
        return (out, *torch.autograd.grad(out.sum(), (q, k, v)))

    whole = run()
    monkeypatch.setattr(enc, "_SCORE_BLOCK_ELEMENTS", 40)  # two query rows per chunk
    chunked = run()
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, atol=1e-6)


def test_dropout_statistics_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(200, 100, requires_grad=True)
    y = dropout(x, 0.25, training=True)
    zero_fraction = (y == 0).float().mean().item()
    assert abs(zero_fraction - 0.25) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)
    assert dropout(x, 0.25, training=False) is x
    assert dropout(x, 0.0, training=True) is x


def test_encoder_shapes_self_and_crossmodal_with_other_head_counts():
    torch.manual_seed(0)
    self_enc = TransformerEncoder(30, 6, 2, attn_mask=True).eval()  # DMD uses 6 heads at d = 30
    assert self_enc.layers[0].self_attn.num_heads == 6
    assert self_enc(torch.randn(7, 2, 30)).shape == (7, 2, 30)
    cross = TransformerEncoder(30, 6, 2, attn_mask=True).eval()
    assert cross(torch.randn(7, 2, 30), torch.randn(11, 2, 30), None).shape == (7, 2, 30)


def test_encoder_train_mode_is_random_and_eval_is_deterministic():
    torch.manual_seed(0)
    encoder = TransformerEncoder(20, 5, 2, attn_dropout=0.2, relu_dropout=0.1, res_dropout=0.1,
                                 embed_dropout=0.2, attn_mask=True)
    x, kv = torch.randn(5, 3, 20), torch.randn(6, 3, 20)
    encoder.train()
    assert not torch.allclose(encoder(x, kv, kv), encoder(x, kv, kv))
    encoder.eval()
    assert torch.equal(encoder(x, kv, kv), encoder(x, kv, kv))


def test_encoder_loads_reference_buffers_and_still_checks_parameters():
    encoder = TransformerEncoder(20, 5, 1)
    state = dict(encoder.state_dict())
    state["version"] = torch.tensor([2.0])
    state["embed_positions._float_tensor"] = torch.tensor([1.0])
    encoder.load_state_dict(state)  # strict, the two weightless buffers are skipped
    del state["layers.0.fc1.weight"]
    with pytest.raises(RuntimeError, match="fc1.weight"):
        encoder.load_state_dict(state)


def test_cached_tables_made_in_inference_mode_still_train():
    encoder = TransformerEncoder(20, 5, 1, attn_mask=True)
    x = torch.randn(13, 2, 20)  # a length no other test uses, so the cache is filled here
    with torch.inference_mode():
        encoder(x)
    encoder(x).sum().backward()
    assert encoder.layers[0].fc1.weight.grad is not None


def test_encoder_runs_under_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    encoder = TransformerEncoder(20, 5, 2, attn_dropout=0.1, attn_mask=True).train()
    x, kv = torch.randn(5, 2, 20), torch.randn(8, 2, 20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = encoder(x, kv, kv)
    assert out.shape == (5, 2, 20) and torch.isfinite(out.float()).all()
    out.float().sum().backward()
    assert torch.isfinite(encoder.layers[0].self_attn.in_proj_weight.grad).all()


def test_dropout_large_path_keeping_lanes_equals_small_path(monkeypatch):
    x = torch.randn(30, 40, requires_grad=True)

    def run():
        torch.manual_seed(5)
        y = dropout(x, 0.3, training=True)
        return y, torch.autograd.grad(y.square().sum(), x)[0]

    small = run()
    monkeypatch.setattr(enc, "_KEEP_MULTIPLIER_ELEMENTS", 0)  # every tensor takes the int16-lanes path
    large = run()
    for a, b in zip(small, large):
        assert torch.allclose(a, b, atol=1e-6)


def test_add_dropout_is_residual_plus_dropout():
    x, branch = torch.randn(50, 40), torch.randn(50, 40, requires_grad=True)
    torch.manual_seed(3)
    fused = enc.add_dropout(x, branch, 0.2, training=True)
    torch.manual_seed(3)
    separate = x + dropout(branch, 0.2, training=True)
    assert torch.allclose(fused, separate, atol=1e-6)
    dropped = (fused - x) == 0
    assert 0.15 < dropped.float().mean().item() < 0.25
    fused.sum().backward()
    assert torch.equal(branch.grad == 0, dropped)
    assert enc.add_dropout(x, branch, 0.2, training=False).equal(x + branch)


@pytest.mark.parametrize("chunked", [False, True])
def test_attention_function_without_dropout_matches_autograd(chunked, monkeypatch):
    if chunked:
        monkeypatch.setattr(enc, "_SCORE_BLOCK_ELEMENTS", 40)  # recompute in chunks of query rows
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 5, 4, requires_grad=True) for _ in range(3))
    mask = future_mask(5, 7, q.device)[:, 2:]  # a (5, 5) mask that blocks some keys
    out = enc._DropoutAttention.apply(q, k, v, mask, 0.0, 0.5)
    expected = torch.softmax(q @ k.transpose(1, 2) * 0.5 + mask, -1) @ v
    assert torch.allclose(out, expected, atol=1e-6)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("crossmodal", [True, False])
def test_last_step_equals_the_last_row_of_the_full_output(crossmodal):
    torch.manual_seed(0)
    encoder = TransformerEncoder(20, 5, 3, attn_mask=True).eval()
    x = torch.randn(7, 2, 20, requires_grad=True)
    kv = torch.randn(9, 2, 20) if crossmodal else None
    full = encoder(x, kv, kv)[-1] if crossmodal else encoder(x)[-1]
    last = encoder(x, kv, kv, last_step=True) if crossmodal else encoder(x, last_step=True)
    assert last.shape == (2, 20) and torch.allclose(last, full, atol=1e-5)
    params = [x, *encoder.parameters()]
    for a, b in zip(torch.autograd.grad(full.square().sum(), params), torch.autograd.grad(last.square().sum(), params)):
        assert torch.allclose(a, b, atol=1e-5)


def test_relu_dropout_unscaled_is_relu_then_dropout_without_the_rescale():
    x = torch.randn(60, 40, requires_grad=True)
    torch.manual_seed(4)
    unscaled = enc.relu_dropout_unscaled(x, 0.25, training=True)
    torch.manual_seed(4)
    reference = dropout(torch.relu(x), 0.25, training=True)
    assert torch.allclose(unscaled / 0.75, reference, atol=1e-6)
    kept = (reference != 0).float()
    assert 0.3 < kept.mean().item() < 0.45  # about half the units are positive, a quarter of those dropped
    grad = torch.randn_like(unscaled)
    (got,) = torch.autograd.grad(unscaled, x, grad)
    assert torch.equal(got, grad * kept)
    assert torch.equal(enc.relu_dropout_unscaled(x, 0.25, training=False), torch.relu(x))
    assert enc._dropout_rescale(0.25, True) == pytest.approx(1 / 0.75)
    assert enc._dropout_rescale(0.25, False) == 1.0 and enc._dropout_rescale(1.0, True) == 1.0


@pytest.mark.parametrize("chunked", [False, True])
def test_attention_function_drops_only_within_its_runs(chunked, monkeypatch):
    if chunked:
        monkeypatch.setattr(enc, "_SCORE_BLOCK_ELEMENTS", 40)
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 5, 4, requires_grad=True) for _ in range(3))
    plain = torch.softmax(q @ k.transpose(1, 2) * 0.5, -1) @ v
    torch.manual_seed(1)
    out = enc._DropoutAttention.apply(q, k, v, None, ((0.0, 0, 2), (0.6, 2, 4)), 0.5)
    assert torch.allclose(out[:2], plain[:2], atol=1e-6) and torch.allclose(out[4:], plain[4:], atol=1e-6)
    assert not torch.allclose(out[2:4], plain[2:4], atol=1e-3)
    # the same rows with one probability for all of them draw the same mask
    torch.manual_seed(1)
    alone = enc._DropoutAttention.apply(q[2:4], k[2:4], v[2:4], None, 0.6, 0.5)
    assert torch.allclose(out[2:4], alone, atol=1e-6)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want_plain = torch.autograd.grad(plain, (q, k, v), grad)
    for a, b in zip(got, want_plain):  # rows outside the run get plain attention's gradients
        assert torch.allclose(a[:2], b[:2], atol=1e-5) and torch.allclose(a[4:], b[4:], atol=1e-5)
    want_alone = torch.autograd.grad(alone, (q, k, v), grad[2:4])
    for a, b in zip(got, want_alone):
        assert torch.allclose(a[2:4], b[2:4], atol=1e-5)
