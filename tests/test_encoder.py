"""The plain MulT encoder: positions, the shifted future mask, attention (and its weights), the encoder."""
import math

import pytest
import torch

from src.models.encoder import MultiheadAttention, TransformerEncoder, embed_input, future_mask, sinusoidal_positions


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


def test_attention_weights_on_request_are_the_softmax_rows():
    torch.manual_seed(0)
    attn = MultiheadAttention(20, 5).eval()
    nn_init_bias(attn)
    q, kv = torch.randn(4, 3, 20), torch.randn(7, 3, 20)
    mask = future_mask(4, 7, q.device)
    out, weights = attn(q, kv, kv, attn_mask=mask, need_weights=True)
    assert weights.shape == (3, 5, 4, 7) and weights.dtype == torch.float32
    assert torch.allclose(weights.sum(-1), torch.ones(3, 5, 4), atol=1e-6)
    blocked = torch.isinf(mask).expand_as(weights)
    assert blocked.any() and torch.all(weights[blocked] == 0)
    assert torch.allclose(out, attn(q, kv, kv, attn_mask=mask), atol=1e-5)  # the same output either way
    e = 20
    w_q, w_k = attn.in_proj_weight[:e], attn.in_proj_weight[e:2 * e]
    b_q, b_k = attn.in_proj_bias[:e], attn.in_proj_bias[e:2 * e]
    scores = ((q @ w_q.T + b_q).view(4, 3, 5, 4).permute(1, 2, 0, 3)
              @ (kv @ w_k.T + b_k).view(7, 3, 5, 4).permute(1, 2, 3, 0)) / 2.0 + mask
    assert torch.allclose(weights, torch.softmax(scores, -1), atol=1e-6)


def test_embed_input_is_scaled_input_plus_positions_then_dropout():
    torch.manual_seed(0)
    x = torch.randn(6, 2, 16)
    x[3, 0] = 0.0  # a padded step: no position
    expected = 4.0 * x + sinusoidal_positions(x)
    assert torch.allclose(embed_input(x, 0.3, training=False), expected, atol=1e-6)
    # the same on a batch-first, padded (G, B, T, E) layout (time axis 2), as the fast engine uses it
    grouped = x.permute(1, 0, 2).unsqueeze(0)
    assert torch.allclose(embed_input(grouped, 0.0, False, time_dim=2)[0].permute(1, 0, 2), expected, atol=1e-6)
    dropped = embed_input(torch.ones(200, 10, 16), 1.0, training=True)
    assert torch.all(dropped == 0)
    kept = embed_input(torch.ones(400, 50, 16), 0.25, training=True) != 0
    assert abs(kept.float().mean().item() - 0.75) < 0.01  # 320k draws: the standard error is under 0.001


def test_plain_layer_dropout_p_one_leaves_only_the_residual_path():
    """res_dropout = 1 drops both residual branches entirely: a layer is then the identity."""
    torch.manual_seed(0)
    encoder = TransformerEncoder(20, 5, 2, attn_dropout=0.3, relu_dropout=0.3, res_dropout=1.0).train()
    x = torch.randn(6, 2, 20)
    assert torch.allclose(encoder.layers[0](x), x) and torch.allclose(encoder.layers[1](x, x, x), x)

