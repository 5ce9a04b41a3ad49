"""CausalMER and BackboneOnly around small non-MulT backbones: the wrapper needs only the backbone contract."""
import pytest
import torch
import torch.nn as nn

from src.causal import CausalHead, CausalMER, causal_loss
from src.errors import ConfigError
from src.losses import task_loss
from src.models.contract import split_backbone_output
from src.models.standalone import BackboneOnly

DIMS = {"text": 6, "audio": 4, "vision": 5}
LENGTHS = {"text": 7, "audio": 9, "vision": 8}
BATCH, EMOTIONS = 6, 4
CLASSES = 2 * EMOTIONS

HEAD_KEYS = {"logits_tie", "logits_te", "te", "nde", "nde_t", "nde_a", "nde_v", "logits_m", "logits_t", "logits_a", "logits_v"}


class MeanOverTime(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


def pool_branch(in_dim):
    return nn.Sequential(MeanOverTime(), nn.Linear(in_dim, CLASSES))


class PooledBackbone(nn.Module):
    """Mean-pool each modality, concatenate, one Linear: returns plain logits."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(sum(DIMS.values()), CLASSES)

    def pooled(self, text, audio, vision):
        return torch.cat([text.mean(1), audio.mean(1), vision.mean(1)], dim=-1)

    def forward(self, text, audio, vision):
        return self.out(self.pooled(text, audio, vision))


class BackboneWithAux(PooledBackbone):
    """Returns (logits, extras) and penalises the size of its pooled features."""

    aux_weight = 0.5

    def forward(self, text, audio, vision):
        features = self.pooled(text, audio, vision)
        return self.out(features), {"features": features}

    def aux_loss(self, extras, target):
        return self.aux_weight * extras["features"].pow(2).mean()


def make_batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    inputs = {name: torch.randn(BATCH, LENGTHS[name], DIMS[name], generator=generator) for name in DIMS}
    target = torch.randint(0, 2, (BATCH, EMOTIONS), generator=generator)
    return inputs, target


def make_model(backbone, fusion="mask"):
    torch.manual_seed(0)
    return CausalMER(backbone, pool_branch(DIMS["text"]), pool_branch(DIMS["audio"]), pool_branch(DIMS["vision"]),
                     CausalHead(fusion=fusion))


def adam_steps(model, inputs, target, steps=15, lr=0.05):
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        optimiser.zero_grad()
        loss = model.loss(model(**inputs), target)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("backbone_class", [PooledBackbone, BackboneWithAux])
def test_forward_returns_head_keys_and_extras(backbone_class):
    model = make_model(backbone_class())
    inputs, _ = make_batch()
    out = model(**inputs)
    assert set(out) == HEAD_KEYS | {"extras"}
    for key in HEAD_KEYS:
        assert out[key].shape == (BATCH, CLASSES)
    assert set(out["extras"]) == (set() if backbone_class is PooledBackbone else {"features"})
    # Each branch saw only its own modality.
    torch.testing.assert_close(out["logits_a"], model.audio_branch(inputs["audio"]))


@pytest.mark.parametrize("backbone_class", [PooledBackbone, BackboneWithAux])
def test_loss_backward_reaches_every_part(backbone_class):
    model = make_model(backbone_class())
    inputs, target = make_batch()
    model.loss(model(**inputs), target).backward()
    for part in ("backbone", "text_branch", "audio_branch", "vision_branch", "head"):
        for name, parameter in getattr(model, part).named_parameters():
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"{part}.{name}"


def test_aux_loss_is_added():
    model = make_model(BackboneWithAux())
    inputs, target = make_batch()
    out = model(**inputs)
    expected = causal_loss(out, target) + 0.5 * out["extras"]["features"].pow(2).mean()
    torch.testing.assert_close(model.loss(out, target), expected)
    plain = make_model(PooledBackbone())
    plain_out = plain(**inputs)
    torch.testing.assert_close(plain.loss(plain_out, target), causal_loss(plain_out, target))


def test_wrapper_passes_alpha_beta_kl():
    model = CausalMER(PooledBackbone(), pool_branch(6), pool_branch(4), pool_branch(5), CausalHead(), alpha=0.3, beta=2.0, kl="pair")
    inputs, target = make_batch()
    out = model(**inputs)
    torch.testing.assert_close(model.loss(out, target), causal_loss(out, target, alpha=0.3, beta=2.0, kl="pair"))
    with pytest.raises(ConfigError):
        CausalMER(PooledBackbone(), pool_branch(6), pool_branch(4), pool_branch(5), CausalHead(), kl="per-emotion")


@pytest.mark.parametrize("backbone_class,fusion", [(PooledBackbone, "mask"), (BackboneWithAux, "hm")])
def test_adam_steps_reduce_loss(backbone_class, fusion):
    model = make_model(backbone_class(), fusion)
    inputs, target = make_batch()
    losses = adam_steps(model, inputs, target)
    # The KL term dominates the total and only the three constants train it, so it falls slowly:
    # look for a clear absolute drop rather than a ratio.
    assert losses[-1] < losses[0] - 0.2


def test_backbone_only_trains_and_adds_aux_loss():
    torch.manual_seed(0)
    model = BackboneOnly(BackboneWithAux())
    inputs, target = make_batch()
    out = model(**inputs)
    assert set(out) == {"logits_m", "extras"}
    expected = task_loss(out["logits_m"], target) + 0.5 * out["extras"]["features"].pow(2).mean()
    torch.testing.assert_close(model.loss(out, target), expected)
    losses = adam_steps(model, inputs, target)
    assert losses[-1] < 0.9 * losses[0]

    plain = BackboneOnly(PooledBackbone())
    plain_out = plain(**inputs)
    assert plain_out["extras"] == {}
    torch.testing.assert_close(plain.loss(plain_out, target), task_loss(plain_out["logits_m"], target))


def test_split_backbone_output_forms():
    logits, hidden = torch.zeros(2, 3), torch.zeros(2, 5)
    assert split_backbone_output(logits) == (logits, {})
    assert split_backbone_output((logits, hidden))[1] == {}
    extras = {"x": hidden}
    assert split_backbone_output((logits, extras))[1] is extras
    for bad in ({"logits": logits}, (logits,), (logits, 3), (logits, hidden, extras)):
        with pytest.raises(TypeError, match="a backbone must return"):
            split_backbone_output(bad)


class BackboneJudgedByItsTaskLoss(BackboneWithAux):
    """Trains with its auxiliary loss but declares that its validation loss leaves it out."""

    validation_uses_aux_loss = False


def test_validation_loss_counts_the_aux_loss_unless_the_backbone_declares_otherwise():
    inputs, target = make_batch()
    aux = lambda out: 0.5 * out["extras"]["features"].pow(2).mean()  # noqa: E731
    for wrapper, own_loss in ((make_model, causal_loss),
                              (BackboneOnly, lambda out, target: task_loss(out["logits_m"], target))):
        counted, declared = wrapper(BackboneWithAux()), wrapper(BackboneJudgedByItsTaskLoss())
        declared.load_state_dict(counted.state_dict())
        out, out_declared = counted(**inputs), declared(**inputs)
        torch.testing.assert_close(counted.validation_loss(out, target), own_loss(out, target) + aux(out))
        torch.testing.assert_close(declared.validation_loss(out_declared, target), own_loss(out_declared, target))
        # the training loss keeps the auxiliary term either way
        torch.testing.assert_close(declared.loss(out_declared, target), own_loss(out_declared, target) + aux(out_declared))
        plain = wrapper(PooledBackbone())
        plain_out = plain(**inputs)
        torch.testing.assert_close(plain.validation_loss(plain_out, target), plain.loss(plain_out, target))


def test_each_wrapper_declares_its_prediction_its_groups_and_its_constants():
    from src.eval.evaluate import main_prediction
    from src.run.build import param_groups

    # Distinct learning rates, so a group given another part's rate is caught.
    lr = {"backbone": 1.0, "text": 2.0, "audio": 3.0, "vision": 4.0, "constant": 5.0}
    causal = make_model(PooledBackbone())
    groups = param_groups(causal, lr)
    assert [(g["name"], g["lr"]) for g in groups] == [
        ("backbone", 1.0), ("text", 2.0), ("audio", 3.0), ("vision", 4.0),
        ("constant_t", 5.0), ("constant_a", 5.0), ("constant_v", 5.0)]
    assert groups[1]["params"] == list(causal.text_branch.parameters())
    assert groups[4]["params"][0] is causal.head.constant_t and groups[6]["params"][0] is causal.head.constant_v
    assert main_prediction(causal) == "tie"
    assert list(causal.constants()) == ["t", "a", "v"] and causal.constants()["a"] is causal.head.constant_a

    alone = BackboneOnly(PooledBackbone())
    assert [(g["name"], g["lr"]) for g in param_groups(alone, lr)] == [("backbone", 1.0)]
    assert main_prediction(alone) == "m" and alone.constants() == {}
