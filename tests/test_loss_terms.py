"""loss_terms: the named, weighted parts of each model's loss, whose sum is the loss."""
import pytest
import torch

from src.causal import CausalHead, CausalMER
from src.causal.loss import kl_term
from src.losses import task_loss
from src.models.standalone import BackboneOnly
from tests.test_causal_model import BackboneWithAux, PooledBackbone, make_batch, pool_branch, DIMS

CAUSAL_TERMS = {"task_te": "logits_te", "task_text": "logits_t", "task_audio": "logits_a", "task_vision": "logits_v"}


def causal(backbone, **loss):
    torch.manual_seed(0)
    branches = [pool_branch(DIMS[m]) for m in ("text", "audio", "vision")]
    return CausalMER(backbone, *branches, CausalHead("mask", constant=0.3), **loss)


@pytest.mark.parametrize("kl", ["all", "pair"])
def test_causal_terms_are_the_weighted_parts_and_sum_to_the_loss(kl):
    model = causal(PooledBackbone(), alpha=0.3, beta=2.0, kl=kl)
    inputs, target = make_batch()
    out = model(**inputs)
    terms = model.loss_terms(out, target)
    assert list(terms) == [*CAUSAL_TERMS, "kl"]
    for name, key in CAUSAL_TERMS.items():
        torch.testing.assert_close(terms[name], 0.3 * task_loss(out[key], target))
    torch.testing.assert_close(terms["kl"], 2.0 * kl_term(out, target.shape[1] if kl == "pair" else 1))
    # The loss, written out independently of loss_terms.
    expected = 0.3 * sum(task_loss(out[key], target) for key in CAUSAL_TERMS.values()) + terms["kl"]
    torch.testing.assert_close(model.loss(out, target), expected)
    torch.testing.assert_close(sum(terms.values()), model.loss(out, target))


def test_the_backbones_auxiliary_loss_is_its_own_term():
    model = causal(BackboneWithAux())
    inputs, target = make_batch(1)
    out = model(**inputs)
    terms = model.loss_terms(out, target)
    assert set(terms) == {*CAUSAL_TERMS, "kl", "aux"}
    torch.testing.assert_close(terms["aux"], model.backbone.aux_loss(out["extras"], target))
    torch.testing.assert_close(sum(terms.values()), model.loss(out, target))
    assert terms["aux"].item() > 0


@pytest.mark.parametrize("backbone, names", [(PooledBackbone, {"task_m"}), (BackboneWithAux, {"task_m", "aux"})])
def test_backbone_alone_terms(backbone, names):
    torch.manual_seed(0)
    model = BackboneOnly(backbone())
    inputs, target = make_batch(2)
    out = model(**inputs)
    terms = model.loss_terms(out, target)
    assert set(terms) == names
    torch.testing.assert_close(terms["task_m"], task_loss(out["logits_m"], target))
    torch.testing.assert_close(model.loss(out, target), sum(terms.values()))
