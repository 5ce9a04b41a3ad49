"""EncoderStack: same-shaped encoders held as stacked weights, run as one batch or each alone."""
import pytest
import torch
from torch import nn

from src.models import encoder_stack as stack_module
from src.models.encoder import TransformerEncoder
from src.models.encoder_stack import EncoderStack, register_member_names, worth_grouping

NAMES = ("first", "second", "third")


def make_stack(attn_dropouts=(0.0, 0.0, 0.0), layers=2, attn_mask=True, **options):
    torch.manual_seed(0)
    return EncoderStack(NAMES, 20, 5, layers, list(attn_dropouts), attn_mask=attn_mask, **options)


def member_grads(stack):
    """Each member weight's gradient, keyed by the member's own state_dict key."""
    grads = {name: p.grad for name, p in stack.named_parameters()}
    return {key: grads[name][index] for name, index, key in stack.member_entries()}


@pytest.mark.parametrize("group", [True, False])
@pytest.mark.parametrize("attn_mask", [True, False])
@pytest.mark.parametrize("crossmodal", [True, False])
def test_stack_equals_separate_encoders_in_values_and_gradients(group, attn_mask, crossmodal):
    stack = make_stack(attn_mask=attn_mask).eval()
    members = [stack.member(name).eval() for name in NAMES]
    queries = [torch.randn(t, 2, 20) for t in (5, 4, 6)]
    keys = [torch.randn(s, 2, 20) for s in (6, 5, 3)] if crossmodal else None
    stacked = stack(queries, keys, group=group)
    separate = [m(q, k, k) if crossmodal else m(q) for m, q, k in zip(members, queries, keys or queries)]
    for a, b in zip(stacked, separate):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5)
    sum(o.square().sum() for o in stacked).backward()
    sum(o.square().sum() for o in separate).backward()
    grads = member_grads(stack)
    for name, member in zip(NAMES, members):
        for key, parameter in member.named_parameters():
            assert torch.allclose(grads[f"{name}.{key}"], parameter.grad, atol=1e-4), (name, key)


@pytest.mark.parametrize("group", [True, False])
def test_last_step_with_different_lengths_equals_the_last_row(group):
    stack = make_stack().eval()
    queries = [torch.randn(t, 2, 20, requires_grad=True) for t in (6, 4, 5)]
    last = stack(queries, last_step=True, group=group)
    full = [m(q)[-1] for m, q in zip((stack.member(n) for n in NAMES), queries)]
    for a, b in zip(last, full):
        assert a.shape == (2, 20) and torch.allclose(a, b, atol=1e-5)
    got = torch.autograd.grad(sum(o.square().sum() for o in last), queries)
    want = torch.autograd.grad(sum(o.square().sum() for o in full), queries)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-4)


def test_members_are_stored_by_attention_dropout_and_returned_in_name_order():
    stack = make_stack(attn_dropouts=(0.5, 0.0, 0.3))
    assert stack.order == (1, 2, 0) and stack.attn_dropouts == (0.0, 0.3, 0.5)
    assert [stack.attn_dropout(n) for n in NAMES] == [0.5, 0.0, 0.3]
    stack.eval()
    queries = [torch.full((3, 1, 20), float(i + 1)) for i in range(3)]
    outputs = stack(queries)
    for name, q, out in zip(NAMES, queries, outputs):
        assert torch.allclose(out, stack.member(name).eval()(q), atol=1e-5)


def test_training_runs_each_attention_dropout_on_its_own_members():
    """Training with only attention dropout: the member whose probability is 0 comes out exactly as
    in eval mode, although it shares the batch with members that drop attention weights."""
    stack = make_stack(attn_dropouts=(0.5, 0.0, 0.3))
    queries = [torch.randn(5, 3, 20) for _ in NAMES]
    keys = [torch.randn(6, 3, 20) for _ in NAMES]
    expected = stack.eval()(queries, keys)
    outputs = stack.train()(queries, keys)
    assert torch.allclose(outputs[1], expected[1], atol=1e-5)
    assert not torch.allclose(outputs[0], expected[0], atol=1e-3)
    assert not torch.allclose(outputs[2], expected[2], atol=1e-3)


def test_training_with_every_dropout_reaches_every_weight():
    stack = make_stack(attn_dropouts=(0.2, 0.0, 0.1), relu_dropout=0.1, res_dropout=0.1, embed_dropout=0.2).train()
    queries = [torch.randn(t, 2, 20) for t in (5, 4, 5)]
    keys = [torch.randn(s, 2, 20) for s in (6, 5, 6)]
    first = stack(queries, keys)
    second = stack(queries, keys)
    assert not torch.allclose(first[0], second[0])
    sum(o.sum() for o in second).backward()
    for name, parameter in stack.named_parameters():
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().sum() > 0, name


def test_initial_weights_equal_separately_built_encoders():
    stack = make_stack(attn_dropouts=(0.3, 0.0, 0.1))
    torch.manual_seed(0)
    separate = [TransformerEncoder(20, 5, 2, attn_dropout=p, attn_mask=True) for p in (0.3, 0.0, 0.1)]
    for name, encoder in zip(NAMES, separate):
        mine = stack.member(name).state_dict()
        for key, value in encoder.state_dict().items():
            assert torch.equal(mine[key], value), (name, key)


class Holder(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoders = make_stack()
        self.head = nn.Linear(20, 2)
        register_member_names(self)


def test_state_dict_uses_member_names_and_round_trips():
    holder = Holder()
    state = holder.state_dict()
    reference_keys = {f"{n}.{k}" for n in NAMES for k in TransformerEncoder(20, 5, 2).state_dict()}
    assert set(state) == reference_keys | {"head.weight", "head.bias"}
    assert torch.equal(state["second.layers.1.fc1.weight"], holder.encoders.member("second").layers[1].fc1.weight)
    other = Holder()
    torch.nn.init.zeros_(other.encoders.fc1_weight)
    other.load_state_dict({k: v.clone() for k, v in state.items()})
    assert torch.equal(other.encoders.fc1_weight, holder.encoders.fc1_weight)
    # separate encoders' state_dicts, with the reference's weightless buffers, load too
    pieces = {}
    for name in NAMES:
        encoder = TransformerEncoder(20, 5, 2)
        pieces.update({f"{name}.{k}": v for k, v in encoder.state_dict().items()})
        pieces[f"{name}.version"] = torch.tensor([2.0])
    pieces.update({"head.weight": state["head.weight"], "head.bias": state["head.bias"]})
    other.load_state_dict(pieces)
    assert torch.equal(other.state_dict()["third.layers.0.self_attn.in_proj_weight"],
                       pieces["third.layers.0.self_attn.in_proj_weight"])


def test_loading_reports_missing_unexpected_and_misshapen_member_weights():
    state = Holder().state_dict()
    missing = dict(state)
    missing.pop("third.layers.1.fc2.bias")
    with pytest.raises(RuntimeError, match=r"Missing key.*third\.layers\.1\.fc2\.bias"):
        Holder().load_state_dict(missing)
    result = Holder().load_state_dict(missing, strict=False)
    assert result.missing_keys == ["third.layers.1.fc2.bias"] and result.unexpected_keys == []
    extra = dict(state, **{"first.layers.0.extra": torch.zeros(1)})
    with pytest.raises(RuntimeError, match=r"Unexpected key.*first\.layers\.0\.extra"):
        Holder().load_state_dict(extra)
    misshapen = dict(state, **{"first.layer_norm.weight": torch.ones(7)})
    with pytest.raises(RuntimeError, match=r"size mismatch for first\.layer_norm\.weight"):
        Holder().load_state_dict(misshapen)


def test_grouping_is_chosen_by_padding_waste(monkeypatch):
    assert worth_grouping([18, 16, 18], [16, 18, 18])
    assert not worth_grouping([18, 400], [400, 18])  # unaligned lengths
    calls = []
    original = stack_module._run
    monkeypatch.setattr(stack_module, "_run", lambda *a, **k: calls.append(len(a[3])) or original(*a, **k))
    stack = make_stack().eval()
    stack([torch.randn(t, 1, 20) for t in (5, 5, 4)])
    stack([torch.randn(t, 1, 20) for t in (5, 40, 4)])
    assert calls == [3, 1, 1, 1]


def test_wrong_number_of_sequences_is_refused():
    with pytest.raises(ValueError, match="3 members"):
        make_stack()([torch.randn(4, 1, 20)] * 2)


def test_sdpa_attention_runs_keep_each_rows_dropout():
    """Off the CPU training path (a GPU), each run of rows goes through SDPA with its own dropout."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 2, 5, 3) for _ in range(3))  # 4 rows (members x batch), 2 heads
    runs = [(0.0, 0, 2), (0.9, 2, 4)]
    attended = stack_module._attend(q, k, v, None, runs, heads=2, on_cpu_training=False)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert attended.shape == plain.shape
    assert torch.allclose(attended[:2], plain[:2], atol=1e-6)
    assert not torch.allclose(attended[2:], plain[2:], atol=1e-3)


def test_cpu_training_takes_sdpa_for_long_attention_without_dropout(monkeypatch):
    """Chunk-recomputing attention only pays when it drops; without dropout SDPA keeps less memory."""
    from src.models import encoder

    calls = []
    original = encoder._DropoutAttention.apply
    monkeypatch.setattr(stack_module._DropoutAttention, "apply", lambda *a: calls.append(1) or original(*a))
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    small = stack_module._attend(q, k, v, None, [(0.0, 0, 2)], heads=2, on_cpu_training=True)
    assert calls == [1] and torch.allclose(small, plain, atol=1e-6)
    monkeypatch.setattr(encoder, "_SCORE_BLOCK_ELEMENTS", 10)  # every problem counts as long now
    long = stack_module._attend(q, k, v, None, [(0.0, 0, 2)], heads=2, on_cpu_training=True)
    assert calls == [1] and torch.allclose(long, plain, atol=1e-6)
    stack_module._attend(q, k, v, None, [(0.0, 0, 1), (0.5, 1, 2)], heads=2, on_cpu_training=True)
    assert calls == [1, 1]  # a run that drops goes through the attention function


def test_index_and_mask_caches_filled_in_inference_mode_still_train():
    """The last-step indices and masks are cached per shape; made under inference_mode they must still
    be usable by a later training step (an inference tensor cannot be saved for backward)."""
    stack = make_stack(attn_dropouts=(0.1, 0.0, 0.0))
    lengths = (7, 5, 6)  # unequal: the padded mask and per-member last steps are needed
    with torch.inference_mode():
        stack.eval()([torch.randn(t, 2, 20) for t in lengths], last_step=True)
    assert stack_module._last_steps(lengths, torch.device("cpu")) is stack_module._last_steps(lengths, torch.device("cpu"))
    assert stack_module._last_steps(lengths, torch.device("cpu"))[1].tolist() == [6, 4, 5]
    outputs = stack.train()([torch.randn(t, 2, 20) for t in lengths], last_step=True)
    sum(o.sum() for o in outputs).backward()
    assert torch.isfinite(stack.in_proj_weight.grad).all()
