"""Gradient accumulation: which batches step the optimiser, when gradients are clipped, and what each
batch's backward divides its loss by (config `train.accumulate` batches per step, `train.accumulation`).

- "reference", DMD's official procedure (docs/design.md § DMD): each batch's loss is back-propagated
  undivided, the gradients are clipped after every backward (so the clip acts on the running sum), the
  optimiser steps and zeroes every `window` batches, and a last partial window of an epoch is discarded
  without a step.
- "corrected": each loss is divided by the window, so a step sees the window's mean gradient; the
  gradients are clipped once, just before each step; a last partial window steps too.
With a window of 1 the two are the same: every batch is backward, clip, step.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..run.config import check_setting


@dataclass(frozen=True)
class Accumulation:
    """The plan of one epoch of `n_batches` batches, numbered from 1."""

    policy: str
    window: int
    n_batches: int

    def __post_init__(self):
        check_setting("train.accumulation", self.policy)
        check_setting("train.accumulate", self.window)

    @property
    def loss_scale(self) -> float:
        """What each batch's loss is multiplied by before its backward."""
        return 1.0 if self.policy == "reference" else 1.0 / self.window

    def steps_after(self, batch: int) -> bool:
        """Whether the optimiser steps (and zeroes the gradients) after this batch."""
        return batch % self.window == 0 or (self.policy == "corrected" and batch == self.n_batches)

    @property
    def steps(self) -> int:
        """Optimiser steps in the epoch."""
        return sum(self.steps_after(batch) for batch in range(1, self.n_batches + 1))

    def clips_after(self, batch: int) -> bool:
        """Whether the gradients are clipped after this batch's backward (before any step)."""
        return self.policy == "reference" or self.steps_after(batch)


def refuse_if_no_step(plan: Accumulation) -> None:
    """Refuse an epoch that would end without an optimiser step (the reference procedure, fewer batches
    than the window): the model would never be trained, so the run is not started (ConfigError, exit 2)."""
    if plan.steps > 0:
        return
    raise ConfigError(f"an epoch has {plan.n_batches} batches, fewer than train.accumulate = {plan.window}, and "
                      f"train.accumulation = {plan.policy} discards a partial window: the model would never be "
                      f"updated, so the run was not started. Fix: --set train.accumulate={plan.n_batches} (or less), "
                      "a smaller train.batch_size, or --set train.accumulation=corrected (which steps the partial window)")
