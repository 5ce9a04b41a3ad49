"""causal_loss and task_loss: reference values and gradients, other tasks, the KL modes, and errors."""
import logging
import math

import pytest
import torch
import torch.nn.functional as F

from src.causal import DEGENERATE_KL_MESSAGE, CausalHead, causal_loss, kl_is_degenerate, warn_if_constants_cannot_learn
from src.errors import ConfigError
from src.losses import task_loss

MODALITIES = "mtav"


def head_with_constants(fusion, constants):
    head = CausalHead(fusion=fusion, constant=0.0)
    with torch.no_grad():
        for name, value in zip("tav", constants):
            getattr(head, f"constant_{name}").fill_(value)
    return head


def run_head(fusion, constants, z):
    """The head's output for leaf copies of z (so their gradients can be read) and the leaves."""
    head = head_with_constants(fusion, constants)
    leaves = {name: z[name].clone().requires_grad_() for name in MODALITIES}
    return head, leaves, head(*(leaves[name] for name in MODALITIES))


def manual_kl(out):
    """The L_KL of docs/design.md § The training objective, written out long-hand, one softmax over the whole last dimension."""
    def h(p, q):
        return (-(F.softmax(out[p], -1) * F.log_softmax(out[q], -1)).sum(-1)).mean()

    return (
        h("te", "nde")
        + (h("nde_t", "nde_a") + h("nde_a", "nde_v") + h("nde_v", "nde_t")) / 3
        + h("te", "nde_t") + h("te", "nde_a") + h("te", "nde_v")
    )


@pytest.mark.parametrize("fusion", ["mask", "sum", "hm", "tanh"])
def test_loss_and_gradients_match_reference_fixture(fixtures_dir, fusion):
    ref = torch.load(fixtures_dir / f"causal_{fusion}_iemocap.pt", weights_only=True)
    head, z, out = run_head(fusion, ref["constants"], ref["z"])
    loss = causal_loss(out, ref["labels"], alpha=ref["alpha"], beta=ref["beta"])
    assert abs(loss.item() - ref["loss"].item()) <= 1e-5
    loss.backward()
    got = {f"z_{name}": z[name].grad for name in MODALITIES}
    got.update({f"constant_{name}": getattr(head, f"constant_{name}").grad for name in "tav"})
    for key, expected in ref["grads"].items():
        torch.testing.assert_close(got[key], expected, atol=1e-5, rtol=0, msg=key)


def random_z(batch, classes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(batch, classes, generator=generator) for name in MODALITIES}


@pytest.mark.parametrize("batch", [1, 3, 9])
def test_binary_tasks_other_batch_sizes(batch):
    _, z, out = run_head("mask", (0.2, -0.1, 0.3), random_z(batch, 8, seed=batch))
    target = torch.randint(0, 2, (batch, 4), generator=torch.Generator().manual_seed(batch))
    expected = 0.1 * sum(
        F.cross_entropy(out[key].reshape(-1, 2), target.reshape(-1)) for key in ("logits_te", "logits_t", "logits_a", "logits_v")
    ) + manual_kl(out)
    torch.testing.assert_close(causal_loss(out, target), expected, atol=1e-6, rtol=0)


def test_seven_class_cls():
    head, z, out = run_head("sum", (0.2, -0.1, 0.3), random_z(5, 7))
    target = torch.tensor([0, 6, 3, 3, 1])
    loss = causal_loss(out, target, alpha=0.5, beta=2.0)
    expected = 0.5 * sum(F.cross_entropy(out[key], target) for key in ("logits_te", "logits_t", "logits_a", "logits_v"))
    expected = expected + 2.0 * manual_kl(out)
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    loss.backward()
    for name in "tav":
        assert getattr(head, f"constant_{name}").grad.abs() > 0
    for name in MODALITIES:
        assert z[name].grad.abs().sum() > 0


def test_regression_has_no_kl_and_constants_cannot_learn():
    head, z, out = run_head("mask", (0.2, -0.1, 0.3), random_z(6, 1))
    target = torch.linspace(-3, 3, 6)
    assert causal_loss(out, target, alpha=0.0).item() == 0.0
    loss = causal_loss(out, target)
    expected = 0.1 * sum(F.l1_loss(out[key][:, 0], target) for key in ("logits_te", "logits_t", "logits_a", "logits_v"))
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=0)
    loss.backward()
    for name in "tav":
        assert getattr(head, f"constant_{name}").grad.item() == 0.0
    assert z["m"].grad.abs().sum() > 0


def test_degenerate_kl_warning(caplog):
    assert kl_is_degenerate(1) and not kl_is_degenerate(7) and not kl_is_degenerate(8)
    logger = logging.getLogger("causal-test")
    with caplog.at_level(logging.WARNING, logger="causal-test"):
        assert warn_if_constants_cannot_learn(8, logger) is False
        assert not caplog.records
        assert warn_if_constants_cannot_learn(1, logger) is True
    assert [record.getMessage() for record in caplog.records] == [DEGENERATE_KL_MESSAGE]
    assert "cls" in DEGENERATE_KL_MESSAGE and "cannot learn" in DEGENERATE_KL_MESSAGE


def test_tanh_constants_get_no_gradient_from_the_kl():
    # For tanh, every Y_k - Y_0 is tanh(z_k) plus a constant shift, and softmax ignores shifts: the KL term
    # cannot move the constants (the fixture's constant gradients are ~0 for the same reason).
    head, _, out = run_head("tanh", (0.2, -0.1, 0.3), random_z(4, 8))
    causal_loss(out, torch.randint(0, 2, (4, 4))).backward()
    for name in "tav":
        assert getattr(head, f"constant_{name}").grad.abs().item() < 1e-6


def test_pair_mode_softmaxes_each_emotion():
    _, _, out = run_head("mask", (0.2, -0.1, 0.3), random_z(3, 8))
    target = torch.tensor([[0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 0, 1]])
    task = 0.1 * sum(task_loss(out[key], target) for key in ("logits_te", "logits_t", "logits_a", "logits_v"))

    def h(p, q):  # per sample, per (absent, present) pair, in plain floats
        total = 0.0
        for b in range(3):
            for k in range(4):
                ps = [out[p][b, 2 * k + j].item() for j in range(2)]
                qs = [out[q][b, 2 * k + j].item() for j in range(2)]
                p_norm = math.log(sum(math.exp(x) for x in ps))
                q_norm = math.log(sum(math.exp(x) for x in qs))
                total += -sum(math.exp(ps[j] - p_norm) * (qs[j] - q_norm) for j in range(2))
        return total / (3 * 4)

    kl = h("te", "nde") + (h("nde_t", "nde_a") + h("nde_a", "nde_v") + h("nde_v", "nde_t")) / 3
    kl += h("te", "nde_t") + h("te", "nde_a") + h("te", "nde_v")
    pair = causal_loss(out, target, kl="pair")
    assert pair.item() == pytest.approx(task.item() + kl, abs=1e-5)
    assert abs(pair.item() - causal_loss(out, target, kl="all").item()) > 1e-3


def test_pair_mode_without_pairs_is_all():
    _, _, out = run_head("hm", (0.2, -0.1, 0.3), random_z(4, 7))
    target = torch.tensor([0, 1, 5, 6])
    torch.testing.assert_close(causal_loss(out, target, kl="pair"), causal_loss(out, target, kl="all"))


def test_unknown_kl_mode_lists_valid_names():
    _, _, out = run_head("mask", (0.0, 0.0, 0.0), random_z(2, 8))
    with pytest.raises(ConfigError, match="all, pair"):
        causal_loss(out, torch.zeros(2, 4, dtype=torch.long), kl="emotion")


def test_task_loss_picks_the_loss_from_the_target():
    logits = torch.tensor([[0.5], [-1.0], [2.0]])
    score = torch.tensor([1.0, 0.0, 2.0])
    assert task_loss(logits, score).item() == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert task_loss(logits, score[:, None]).item() == task_loss(logits, score).item()

    class_logits = torch.randn(4, 7)
    labels = torch.tensor([0, 6, 2, 2])
    torch.testing.assert_close(task_loss(class_logits, labels), F.cross_entropy(class_logits, labels))

    pair_logits = torch.randn(2, 8)
    pair_labels = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.int32)
    per_emotion = [F.cross_entropy(pair_logits[:, 2 * k:2 * k + 2], pair_labels[:, k].long()) for k in range(4)]
    torch.testing.assert_close(task_loss(pair_logits, pair_labels), torch.stack(per_emotion).mean())


@pytest.mark.parametrize(
    "logits,target,message",
    [
        (torch.zeros(3, 1), torch.zeros(4), "regression"),
        (torch.zeros(3, 2), torch.zeros(3), "regression"),
        (torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), "at least 2 classes"),
        (torch.zeros(3, 7), torch.zeros(3, 4, dtype=torch.long), "2K"),
        (torch.zeros(3, 7), torch.zeros(2, dtype=torch.long), r"\(3, 7\)"),
        (torch.zeros(3), torch.zeros(3), "batch, classes"),
        (torch.zeros(3, 2), torch.zeros(3, dtype=torch.bool), "floating"),
    ],
)
def test_task_loss_rejects_mismatched_shapes(logits, target, message):
    with pytest.raises(ValueError, match=message):
        task_loss(logits, target)
