"""The execution engines: "fast" computes what "plain" (the encoders' own forward) computes.

Its contract: equal outputs in eval mode and equal gradients of every parameter in training mode
without dropout; the same dropout distribution in training (p = 1 drops everything, keep rates
1 - p, each encoder's own attention dropout); a frozen encoder stays frozen. Then the pieces the
fast engine is built from (its CPU dropout and attention with a hand-written backward).
"""
import pytest
import torch

from src.errors import ConfigError
from src.models import engine as eng
from src.models.encoder import TransformerEncoder, embed_input, future_mask
from src.models.engine import ENGINES, resolve_engine, run_encoders
from src.models.mult import CROSSMODAL_NAMES, MulT

WIDTH, HEADS = 20, 5


def encoders(attn_dropouts=(0.0, 0.0, 0.0), layers=2, attn_mask=True, seed=0, **options):
    """Same-shaped encoders with every parameter randomised (LayerNorm affine parts and biases too,
    so that folding them into the next Linear is exercised)."""
    torch.manual_seed(seed)
    built = [TransformerEncoder(WIDTH, HEADS, layers, attn_dropout=p, attn_mask=attn_mask, **options)
             for p in attn_dropouts]
    with torch.no_grad():
        for encoder in built:
            for parameter in encoder.parameters():
                parameter.add_(0.3 * torch.randn_like(parameter))
    return built


def outputs_and_grads(built, queries, keys, last_step, engine):
    for encoder in built:
        encoder.zero_grad(set_to_none=True)
    queries = [q.detach().clone().requires_grad_() for q in queries]
    outs = run_encoders(built, queries, keys, last_step=last_step, engine=engine)
    sum((o * torch.linspace(-1, 1, o.shape[-1])).square().sum() for o in outs).backward()
    grads = {(i, name): p.grad.clone() for i, e in enumerate(built) for name, p in e.named_parameters()}
    return outs, grads, [q.grad for q in queries]


@pytest.mark.parametrize("last_step", [False, True])
@pytest.mark.parametrize("attn_mask", [True, False])
@pytest.mark.parametrize("crossmodal", [True, False])
@pytest.mark.parametrize("lengths", [((5, 5, 5), (6, 6, 6)),      # equal: one batch, no padding
                                     ((5, 4, 6), (6, 5, 4)),      # similar: one padded batch
                                     ((3, 30, 4), (30, 3, 28))])  # unequal: each alone
def test_fast_equals_plain_in_outputs_and_every_gradient(lengths, crossmodal, attn_mask, last_step):
    """Training mode with every dropout 0 (so gradients are those of training), and eval mode."""
    built = encoders(attn_mask=attn_mask)
    query_lengths, key_lengths = lengths
    queries = [torch.randn(t, 2, WIDTH) for t in query_lengths]
    keys = [torch.randn(s, 2, WIDTH) for s in key_lengths] if crossmodal else None
    for encoder in built:
        encoder.train()
    plain = outputs_and_grads(built, queries, keys, last_step, "plain")
    fast = outputs_and_grads(built, queries, keys, last_step, "fast")
    for a, b in zip(plain[0], fast[0]):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    for key, grad in plain[1].items():
        assert torch.allclose(grad, fast[1][key], atol=1e-4), key
    for a, b in zip(plain[2], fast[2]):
        assert torch.allclose(a, b, atol=1e-4)
    with torch.no_grad():
        for encoder in built:
            encoder.eval()
        for a, b in zip(run_encoders(built, queries, keys, last_step, "plain"),
                        run_encoders(built, queries, keys, last_step, "fast")):
            assert torch.allclose(a, b, atol=1e-5)


def test_encoders_of_different_shapes_or_layers_are_each_computed_correctly():
    wide = TransformerEncoder(2 * WIDTH, HEADS, 3, attn_mask=True).eval()
    odd = TransformerEncoder(WIDTH, HEADS, 2).eval()
    odd.layers[1].relu_dropout = 0.5  # layers that differ: computed by its own forward
    built = [*encoders(attn_dropouts=(0.0, 0.0)), wide, odd]
    for encoder in built:
        encoder.eval()
    queries = [torch.randn(5, 2, WIDTH), torch.randn(5, 2, WIDTH), torch.randn(4, 2, 2 * WIDTH), torch.randn(6, 2, WIDTH)]
    with torch.no_grad():
        for a, b in zip(run_encoders(built, queries, engine="plain"), run_encoders(built, queries, engine="fast")):
            assert torch.allclose(a, b, atol=1e-5)
    assert eng._groups(built) == [[0, 1], [2], [3]]


def test_p_one_drops_everything_and_each_encoder_keeps_its_own_attention_dropout():
    """Attention dropout 1 leaves only the out-projection's bias of attention; relu dropout 1 only
    fc2's bias. An encoder of the same group with attention dropout 0 is unaffected."""
    built = encoders(attn_dropouts=(1.0, 0.0), layers=2, relu_dropout=1.0)
    queries = [torch.randn(5, 3, WIDTH) for _ in built]
    keys = [torch.randn(6, 3, WIDTH) for _ in built]
    for encoder in built:
        encoder.train()
    for engine in ENGINES:
        dropped, attended = run_encoders(built, queries, keys, engine=engine)
        x = embed_input(queries[0], 0.0, False)
        for layer in built[0].layers:
            x = x + layer.self_attn.out_proj.bias + layer.fc2.bias
        assert torch.allclose(dropped, built[0].layer_norm(x), atol=1e-5), engine
        # the p = 0 encoder: attention exactly as in eval mode, feed-forward reduced to fc2's bias
        x = embed_input(queries[1], 0.0, False)
        k = embed_input(keys[1], 0.0, False)
        mask = future_mask(5, 6, x.device)
        for layer in built[1].layers:
            norm = layer.layer_norms[0]
            x = x + layer.self_attn.eval()(norm(x), norm(k), norm(k), attn_mask=mask) + layer.fc2.bias
            layer.self_attn.train()
        assert torch.allclose(attended, built[1].layer_norm(x), atol=1e-5), engine


def dropout_moments(engine, rows=3000):
    """Mean and mean square over `rows` identical samples of a training-mode crossmodal group with every
    dropout on (each sample draws its own masks)."""
    built = encoders(attn_dropouts=(0.3, 0.6), layers=1, relu_dropout=0.2, res_dropout=0.2, embed_dropout=0.25)
    for encoder in built:
        encoder.train()
    torch.manual_seed(1)
    base_q, base_k = torch.randn(4, 1, WIDTH), torch.randn(5, 1, WIDTH)
    queries = [base_q.expand(4, rows, WIDTH).contiguous()] * 2
    keys = [base_k.expand(5, rows, WIDTH).contiguous()] * 2
    torch.manual_seed(2)
    with torch.no_grad():
        outs = run_encoders(built, queries, keys, engine=engine)
    return [(o.mean(1), o.square().mean(1), o.std(1) / rows ** 0.5) for o in outs]


def test_fast_has_the_dropout_distribution_of_plain():
    """Per output element, the mean and mean square over 3000 independently dropped samples agree
    between the engines within 5 standard errors (a missing 1/(1-p) rescale, a mask shared across
    samples or another encoder's p all move them by far more)."""
    plain, fast = dropout_moments("plain"), dropout_moments("fast")
    for (mean_p, square_p, error), (mean_f, square_f, _) in zip(plain, fast):
        tolerance = 5 * error * 2 ** 0.5  # the difference of two independent means
        assert ((mean_p - mean_f).abs() <= tolerance).float().mean() > 0.99
        assert ((square_p - square_f).abs() <= 10 * tolerance).float().mean() > 0.99


def test_a_frozen_encoder_stays_frozen_under_the_fast_engine():
    torch.manual_seed(0)
    model = MulT(orig_dims=(6, 5, 4), kernel_sizes=(1, 1, 1), d_model=10, layers=1, output_dim=2,
                 engine="fast").train()
    model.trans_l_with_a.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.trans_l_with_a.named_parameters()}
    other = model.trans_l_with_v.layers[0].fc1.weight.detach().clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x = [torch.randn(3, 7, d) for d in (6, 5, 4)]
    for _ in range(2):
        logits, _ = model(*x)
        optimizer.zero_grad()
        logits.square().sum().backward()
        optimizer.step()
    for name, parameter in model.trans_l_with_a.named_parameters():
        assert parameter.grad is None and torch.equal(parameter, frozen[name]), name
    assert not torch.equal(model.trans_l_with_v.layers[0].fc1.weight, other)


def test_mult_holds_plain_encoders_and_its_state_dict_is_the_same_for_every_engine():
    names = set()
    for engine in ENGINES:
        torch.manual_seed(0)
        model = MulT(orig_dims=(6, 5, 4), d_model=10, layers=1, engine=engine)
        assert all(isinstance(getattr(model, n), TransformerEncoder) for n in CROSSMODAL_NAMES)
        names.add(tuple(model.state_dict()))
    assert len(names) == 1


def test_resolve_engine():
    assert resolve_engine("auto", "cpu") == "fast"
    assert resolve_engine("auto", torch.device("meta")) == "plain"
    assert resolve_engine("plain", "cpu") == "plain" and resolve_engine("fast", "cuda") == "fast"
    with pytest.raises(ConfigError, match="unknown engine 'quick'.*model.backbone_params.engine"):
        resolve_engine("quick", "cpu")
    with pytest.raises(ConfigError, match="unknown engine"):
        MulT(orig_dims=(6, 5, 4), d_model=10, layers=1, engine="quick")


def test_wrong_number_of_sequences_is_refused():
    with pytest.raises(ValueError, match="3 encoders"):
        run_encoders(encoders(), [torch.randn(4, 1, WIDTH)] * 2)


def test_index_and_mask_caches_filled_in_inference_mode_still_train():
    """The last-step indices and padded masks are cached per shape; made under inference_mode they must
    still be usable by a later training step (an inference tensor cannot be saved for backward)."""
    built = encoders(attn_dropouts=(0.1, 0.0, 0.0))
    lengths = (7, 5, 6)  # unequal: the padded mask and per-encoder last steps are needed
    with torch.inference_mode():
        run_encoders([e.eval() for e in built], [torch.randn(t, 2, WIDTH) for t in lengths], last_step=True)
    assert eng._last_steps(lengths, torch.device("cpu"))[1].tolist() == [6, 4, 5]
    outs = run_encoders([e.train() for e in built], [torch.randn(t, 2, WIDTH) for t in lengths], last_step=True)
    sum(o.sum() for o in outs).backward()
    assert torch.isfinite(built[0].layers[0].self_attn.in_proj_weight.grad).all()


def test_sdpa_attention_runs_keep_each_rows_dropout():
    """Off the CPU training path (a GPU), each run of rows goes through SDPA with its own dropout."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 5, 3) for _ in range(3))  # 4 rows (encoders x batch), 2 heads
    attended = eng._attend(q, k, v, None, [(0.0, 0, 2), (0.9, 2, 4)], heads=2, on_cpu_training=False)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert torch.allclose(attended[:2], plain[:2], atol=1e-6)
    assert not torch.allclose(attended[2:], plain[2:], atol=1e-3)


def test_attend_runs_a_modules_attention_with_the_same_dropout_draw():
    """With the same random draw, the fast attention equals softmax(q·kᵀ/√d)·keep @ v on the module's own
    weights, in values and gradients; outside CPU training it is the module's forward."""
    from src.models.encoder import MultiheadAttention

    torch.manual_seed(0)
    attention = MultiheadAttention(12, 3, attn_dropout=0.3).train()
    with torch.no_grad():
        attention.in_proj_bias.normal_()
        attention.out_proj.bias.normal_()
    query = torch.randn(5, 2, 12, requires_grad=True)
    source = torch.randn(8, 2, 12, requires_grad=True)
    torch.manual_seed(7)
    out = eng.attend(attention, query, source, source, "fast")
    torch.manual_seed(7)
    keep = eng._keep_scale(eng._random_lanes((2 * 3, 5, 8), query.device), 0.3)

    def heads(x, index):  # (T, B, E) -> (B·H, T, 4), batch-major as the function splits them
        w, b = attention.in_proj_weight.chunk(3)[index], attention.in_proj_bias.chunk(3)[index]
        return (x @ w.T + b).reshape(x.shape[0], 2 * 3, 4).transpose(0, 1)

    weights = torch.softmax(heads(query, 0) @ heads(source, 1).transpose(1, 2) / 2.0, -1) * keep
    expected = attention.out_proj((weights @ heads(source, 2)).transpose(0, 1).reshape(5, 2, 12))
    assert torch.allclose(out, expected, atol=1e-5)
    params = (query, source, attention.in_proj_weight)
    for got, want in zip(torch.autograd.grad(out.square().sum(), params), torch.autograd.grad(expected.square().sum(), params)):
        assert torch.allclose(got, want, atol=1e-4)
    attention.eval()
    assert torch.equal(eng.attend(attention, query, source, source, "fast"), attention(query, source, source))


# --- the pieces: CPU dropout and attention with a hand-written backward -------------------------------

def test_keep_rates_of_the_cpu_dropout_pieces():
    """On 10^6 draws the keep rate's standard error is below 5e-4: 0.005 is ten of them."""
    torch.manual_seed(0)
    x = torch.ones(1000, 1000)
    for p in (0.1, 0.25, 0.6):
        assert abs((eng.dropout(x, p, True) != 0).float().mean().item() - (1 - p)) < 0.005
        assert abs(((eng.add_dropout(x, x, p, True) - x) != 0).float().mean().item() - (1 - p)) < 0.005
        assert abs((eng.relu_dropout_unscaled(x, p, True) != 0).float().mean().item() - (1 - p)) < 0.005
        kept = eng._keep_scale(eng._random_lanes((1000, 1000), x.device), p)
        assert abs((kept != 0).float().mean().item() - (1 - p)) < 0.005
        assert torch.allclose(kept[kept != 0], torch.tensor(1 / (1 - p)))
    assert torch.all(eng.dropout(x, 1.0, True) == 0) and torch.all(eng._keep_scale(eng._random_lanes((9,), x.device), 1.0) == 0)


def test_dropout_attention_matches_naive_values_and_gradients():
    """The same random draw gives the same mask: the function equals softmax(...)·keep @ v."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 5, 4, requires_grad=True) for _ in range(3))
    mask = future_mask(5, 8, q.device)[:, 3:]
    torch.manual_seed(7)
    out = eng._DropoutAttention.apply(q, k, v, mask, 0.3, 0.5)
    torch.manual_seed(7)
    keep = eng._keep_scale(eng._random_lanes((6, 5, 5), q.device), 0.3)
    expected = (torch.softmax(q @ k.transpose(1, 2) * 0.5 + mask, -1) * keep) @ v
    assert torch.allclose(out, expected, atol=1e-5)
    grad = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(expected, (q, k, v), grad)):
        assert torch.allclose(got, want, atol=1e-5)


def test_chunked_dropout_attention_equals_single_chunk(monkeypatch):
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 9, 5, requires_grad=True) for _ in range(3))
    mask = future_mask(9, 9, q.device)

    def run():
        torch.manual_seed(3)
        out = eng._DropoutAttention.apply(q, k, v, mask, 0.2, 0.5)
        return (out, *torch.autograd.grad(out.sum(), (q, k, v)))

    whole = run()
    monkeypatch.setattr(eng, "_SCORE_BLOCK_ELEMENTS", 40)  # two query rows per chunk
    chunked = run()
    for a, b in zip(whole, chunked):
        assert torch.allclose(a, b, atol=1e-6)


def test_dropout_statistics_and_gradient():
    torch.manual_seed(0)
    x = torch.ones(200, 100, requires_grad=True)
    y = eng.dropout(x, 0.25, training=True)
    zero_fraction = (y == 0).float().mean().item()
    assert abs(zero_fraction - 0.25) < 0.01
    assert torch.allclose(y[y != 0], torch.full_like(y[y != 0], 1 / 0.75))
    y.sum().backward()
    assert torch.equal(x.grad == 0, y == 0)
    assert eng.dropout(x, 0.25, training=False) is x
    assert eng.dropout(x, 0.0, training=True) is x


def test_dropout_large_path_keeping_lanes_equals_small_path(monkeypatch):
    x = torch.randn(30, 40, requires_grad=True)

    def run():
        torch.manual_seed(5)
        y = eng.dropout(x, 0.3, training=True)
        return y, torch.autograd.grad(y.square().sum(), x)[0]

    small = run()
    monkeypatch.setattr(eng, "_KEEP_MULTIPLIER_ELEMENTS", 0)  # every tensor takes the int16-lanes path
    large = run()
    for a, b in zip(small, large):
        assert torch.allclose(a, b, atol=1e-6)


def test_add_dropout_is_residual_plus_dropout():
    x, branch = torch.randn(50, 40), torch.randn(50, 40, requires_grad=True)
    torch.manual_seed(3)
    fused = eng.add_dropout(x, branch, 0.2, training=True)
    torch.manual_seed(3)
    separate = x + eng.dropout(branch, 0.2, training=True)
    assert torch.allclose(fused, separate, atol=1e-6)
    dropped = (fused - x) == 0
    assert 0.15 < dropped.float().mean().item() < 0.25
    fused.sum().backward()
    assert torch.equal(branch.grad == 0, dropped)
    assert eng.add_dropout(x, branch, 0.2, training=False).equal(x + branch)


@pytest.mark.parametrize("chunked", [False, True])
def test_attention_function_without_dropout_matches_autograd(chunked, monkeypatch):
    if chunked:
        monkeypatch.setattr(eng, "_SCORE_BLOCK_ELEMENTS", 40)  # recompute in chunks of query rows
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 5, 4, requires_grad=True) for _ in range(3))
    mask = future_mask(5, 7, q.device)[:, 2:]  # a (5, 5) mask that blocks some keys
    out = eng._DropoutAttention.apply(q, k, v, mask, 0.0, 0.5)
    expected = torch.softmax(q @ k.transpose(1, 2) * 0.5 + mask, -1) @ v
    assert torch.allclose(out, expected, atol=1e-6)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(expected, (q, k, v), grad)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5)


def test_relu_dropout_unscaled_is_relu_then_dropout_without_the_rescale():
    x = torch.randn(60, 40, requires_grad=True)
    torch.manual_seed(4)
    unscaled = eng.relu_dropout_unscaled(x, 0.25, training=True)
    torch.manual_seed(4)
    reference = eng.dropout(torch.relu(x), 0.25, training=True)
    assert torch.allclose(unscaled / 0.75, reference, atol=1e-6)
    kept = (reference != 0).float()
    assert 0.3 < kept.mean().item() < 0.45  # about half the units are positive, a quarter of those dropped
    grad = torch.randn_like(unscaled)
    (got,) = torch.autograd.grad(unscaled, x, grad)
    assert torch.equal(got, grad * kept)
    assert torch.equal(eng.relu_dropout_unscaled(x, 0.25, training=False), torch.relu(x))
    assert eng._dropout_rescale(0.25, True) == pytest.approx(1 / 0.75)
    assert eng._dropout_rescale(0.25, False) == 1.0 and eng._dropout_rescale(1.0, True) == 1.0


@pytest.mark.parametrize("chunked", [False, True])
def test_attention_function_drops_only_within_its_runs(chunked, monkeypatch):
    if chunked:
        monkeypatch.setattr(eng, "_SCORE_BLOCK_ELEMENTS", 40)
    torch.manual_seed(0)
    q, k, v = (torch.randn(6, 5, 4, requires_grad=True) for _ in range(3))
    plain = torch.softmax(q @ k.transpose(1, 2) * 0.5, -1) @ v
    torch.manual_seed(1)
    out = eng._DropoutAttention.apply(q, k, v, None, ((0.0, 0, 2), (0.6, 2, 4)), 0.5)
    assert torch.allclose(out[:2], plain[:2], atol=1e-6) and torch.allclose(out[4:], plain[4:], atol=1e-6)
    assert not torch.allclose(out[2:4], plain[2:4], atol=1e-3)
    # the same rows with one probability for all of them draw the same mask
    torch.manual_seed(1)
    alone = eng._DropoutAttention.apply(q[2:4], k[2:4], v[2:4], None, 0.6, 0.5)
    assert torch.allclose(out[2:4], alone, atol=1e-6)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want_plain = torch.autograd.grad(plain, (q, k, v), grad)
    for a, b in zip(got, want_plain):  # rows outside the run get plain attention's gradients
        assert torch.allclose(a[:2], b[:2], atol=1e-5) and torch.allclose(a[4:], b[4:], atol=1e-5)
    want_alone = torch.autograd.grad(alone, (q, k, v), grad[2:4])
    for a, b in zip(got, want_alone):
        assert torch.allclose(a[2:4], b[2:4], atol=1e-5)


# --- one checkpoint layout whatever the engine --------------------------------------------------------

def tiny_run_config(data_dir, engine, epochs):
    """A tiny MulT trained alone, every dropout 0: then the engines compute the same training run."""
    from src.run.config import load_config

    cfg = load_config("iemocap", backbone="mult", model_name="backbone")
    cfg["data"]["dir"] = str(data_dir)
    cfg["model"]["backbone_params"].update(
        d_model=10, layers=1, engine=engine, attn_dropout=0.0, attn_dropout_a=0.0, attn_dropout_v=0.0,
        relu_dropout=0.0, res_dropout=0.0, embed_dropout=0.0, out_dropout=0.0)
    cfg["train"].update(epochs=epochs, batch_size=8, eval_batch_size=16)
    return cfg


@pytest.mark.slow
def test_a_run_trained_with_one_engine_evaluates_with_the_other_and_resumes_only_with_its_own(synthetic_data,
                                                                                               tmp_path):
    from src.errors import ConfigError
    from src.run import checkpoint as ckpt_io
    from src.run.build import load_data, make_model
    from src.train import loop
    from src.run.distributed import Context
    from src.eval.evaluate import evaluate

    data_dir = synthetic_data(dataset="iemocap", scale=0.003)
    ctx = Context(torch.device("cpu"))
    cut = tmp_path / "cut"
    cut.mkdir()
    loop.train(tiny_run_config(data_dir, "fast", 1), cut, ctx, seed=1)

    # the fast run's checkpoint loads strictly into a plain model and evaluates to the same
    saved = ckpt_io.load_checkpoint(cut / "last.pt")
    splits = load_data(tiny_run_config(data_dir, "plain", 1))
    scores = []
    for engine in ENGINES:
        model = make_model(tiny_run_config(data_dir, engine, 1), splits["train"], ctx.device)
        ckpt_io.load_model_state(model, saved["model"], cut / "last.pt")
        scores.append(evaluate(model, splits["valid"], 16, ctx)["loss"])
    assert scores[0] == pytest.approx(scores[1], abs=1e-5)

    # ... but training goes on only with the engine it started with: another one draws other dropout
    with pytest.raises(ConfigError, match="'fast' engine"):
        loop.train(tiny_run_config(data_dir, "plain", 2), cut, ctx, seed=1, resume=True)
    resumed = loop.train(tiny_run_config(data_dir, "fast", 2), cut, ctx, seed=1, resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
