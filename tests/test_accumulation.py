"""Gradient accumulation (train.accumulate, train.accumulation): the plan batch by batch, and one epoch of
the training loop on a one-parameter model against a hand-computed sequence of clipped gradients and steps."""
import pytest
import torch
from torch import nn

from src.errors import ConfigError
from src.train.accumulation import Accumulation, refuse_if_no_step
from src.run.config import load_config
from src.run.distributed import Context
from src.train.loop import epoch_order, train_epoch
from tests.helpers import run


def test_reference_plan_steps_every_window_clips_every_batch_and_drops_the_partial_window():
    plan = Accumulation("reference", window=10, n_batches=23)
    assert plan.loss_scale == 1.0
    assert [b for b in range(1, 24) if plan.steps_after(b)] == [10, 20]
    assert all(plan.clips_after(b) for b in range(1, 24))


def test_corrected_plan_divides_by_the_window_clips_before_each_step_and_steps_the_partial_window():
    plan = Accumulation("corrected", window=10, n_batches=23)
    assert plan.loss_scale == pytest.approx(0.1)
    assert [b for b in range(1, 24) if plan.steps_after(b)] == [10, 20, 23]
    assert [b for b in range(1, 24) if plan.clips_after(b)] == [10, 20, 23]


def test_a_window_of_one_is_the_same_under_both_policies():
    for policy in ("reference", "corrected"):
        plan = Accumulation(policy, window=1, n_batches=5)
        assert plan.loss_scale == 1.0
        assert all(plan.steps_after(b) and plan.clips_after(b) for b in range(1, 6))


def test_an_epoch_that_would_never_step_is_refused():
    assert Accumulation("reference", window=10, n_batches=9).steps == 0
    with pytest.raises(ConfigError) as refused:
        refuse_if_no_step(Accumulation("reference", window=10, n_batches=9))
    message = str(refused.value)
    assert "9 batches" in message and "train.accumulate = 10" in message and "train.accumulate=9" in message
    assert Accumulation("reference", window=10, n_batches=25).steps == 2
    assert Accumulation("corrected", window=10, n_batches=9).steps == 1
    refuse_if_no_step(Accumulation("corrected", window=10, n_batches=9))
    refuse_if_no_step(Accumulation("reference", window=10, n_batches=10))


def test_a_run_that_cannot_learn_is_refused_before_its_directory_exists(capsys, synthetic_data, tmp_path):
    code, _, err = run(capsys, "train", "--dataset", "iemocap", "--name", "x", "--data-dir", synthetic_data(),
                       "--runs-dir", tmp_path, "--device", "cpu", "--set", "train.accumulation=reference",
                       "--set", "train.accumulate=100000")
    assert code == 2 and "train.accumulate = 100000" in err and "Traceback" not in err
    assert not (tmp_path / "iemocap" / "x").exists()


def test_an_unknown_policy_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="train.accumulation"):
        Accumulation("mean", window=2, n_batches=3)
    with pytest.raises(ConfigError, match="train.accumulation"):
        load_config("iemocap", overrides=["train.accumulation=mean"])


def test_dmd_trains_with_the_reference_procedure_and_the_dataset_default_is_corrected():
    assert load_config("mosei_senti", backbone="dmd")["train"]["accumulation"] == "reference"
    for backbone in ("mult", "pmr"):
        train = load_config("mosei_senti", backbone=backbone)["train"]
        assert (train["accumulate"], train["accumulation"]) == (1, "corrected")


class Slope(nn.Module):
    """loss = w · g with g the batch's text value: each batch's gradient on w is its own g."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, text, audio, vision):
        return {"g": text.sum()}

    def loss_terms(self, out, target):
        return {"slope": self.w * out["g"]}

    def loss(self, out, target):
        return sum(self.loss_terms(out, target).values())


class Gradients:
    """A dataset of one-sample batches whose sample i carries gradient values[i]."""

    def __init__(self, values):
        self.values = torch.tensor(values)

    def __len__(self):
        return len(self.values)

    def get_batch(self, indices):
        g = self.values[torch.as_tensor(indices)].view(-1, 1, 1)
        zeros = torch.zeros(len(indices), 1, 1)
        return {"text": g, "audio": zeros, "vision": zeros, "target": torch.zeros(len(indices))}


GRADIENTS = [1.6, -0.8, 0.3, 1.1, 0.2]


def run_epoch(policy):
    """One epoch, batch 1, window 2, value clip 0.6, SGD lr 1; the gradients in the epoch's order."""
    model = Slope()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dataset = Gradients(GRADIENTS)
    order = epoch_order(len(dataset), 0, 1)
    # Put the values into the file in the order the epoch will visit them.
    dataset.values[torch.as_tensor(order)] = torch.tensor(GRADIENTS)
    tcfg = {"batch_size": 1, "accumulate": 2, "accumulation": policy, "grad_clip_value": 0.6, "grad_clip_norm": None,
            "missing_rate": 0.0}
    train_epoch(model, optimizer, dataset, tcfg, Context(torch.device("cpu")), seed=0, epoch=1, amp=False)
    return model.w.item(), model.w.grad


def test_reference_epoch_by_hand():
    """Gradients 1.6, -0.8 | 0.3, 1.1 | 0.2, undivided, clipped after each backward:
    1.6 -> 0.6; -0.8 gives -0.2, step (w = 0.2); 0.3; +1.1 = 1.4 -> 0.6, step (w = -0.4);
    0.2, the partial window: no step, and its gradient is dropped."""
    w, grad = run_epoch("reference")
    assert w == pytest.approx(-0.4, abs=1e-6)
    assert grad is None


def test_corrected_epoch_by_hand():
    """The same gradients halved, clipped once before each step: 0.8 - 0.4 = 0.4, step (w = -0.4);
    0.15 + 0.55 = 0.7 -> 0.6, step (w = -1.0); 0.1, the partial window steps (w = -1.1)."""
    w, grad = run_epoch("corrected")
    assert w == pytest.approx(-1.1, abs=1e-6)
    assert grad is None
