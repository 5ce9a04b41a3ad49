"""Task losses, chosen from the target so that one loop serves every dataset and task.

| target                         | logits   | loss                                                  |
|--------------------------------|----------|-------------------------------------------------------|
| floating (B,) or (B, 1)        | (B, 1)   | L1 against the score (regression)                     |
| integer (B,)                   | (B, C)   | cross-entropy over C classes (cls)                    |
| integer (B, K)                 | (B, 2K)  | K binary tasks: cross-entropy over logits viewed      |
|                                |          | (B·K, 2) against (B·K,) targets, averaged (IEMOCAP)   |
"""
import torch
import torch.nn.functional as F

_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def target_kind(logits: torch.Tensor, target: torch.Tensor) -> str:
    """Classify a (logits, target) pair as 'regression', 'cls' or 'binary', or raise ValueError.

    The shapes are checked here so a mismatch fails with the two shapes in the message instead of
    broadcasting silently (L1 of (B, 1) against (B,) would otherwise compare every pair of samples).
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be (batch, classes); got shape {tuple(logits.shape)}")
    batch, num_outputs = logits.shape
    shapes = f"logits {tuple(logits.shape)}, target {tuple(target.shape)} ({target.dtype})"

    if target.is_floating_point():
        if num_outputs == 1 and target.shape in ((batch,), (batch, 1)):
            return "regression"
        raise ValueError(f"a floating target means regression: expected logits (B, 1) and target (B,) or (B, 1); got {shapes}")
    if target.dtype in _INTEGER_DTYPES:
        if target.shape == (batch,):
            if num_outputs < 2:
                raise ValueError(f"an integer (B,) target means classification: logits need at least 2 classes; got {shapes}")
            return "cls"
        if target.dim() == 2 and target.shape[0] == batch and num_outputs == 2 * target.shape[1]:
            return "binary"
        raise ValueError(
            f"an integer target must be (B,) for classification or (B, K) with logits (B, 2K) for K binary tasks; got {shapes}"
        )
    raise ValueError(f"target must be a floating (regression) or integer (classification) tensor; got {shapes}")


def task_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The task's loss ℓ for these logits, picked from the target (see the module table)."""
    kind = target_kind(logits, target)
    if kind == "regression":
        return F.l1_loss(logits, target.reshape(logits.shape).to(logits.dtype))
    if kind == "cls":
        return F.cross_entropy(logits, target.long())
    return F.cross_entropy(logits.reshape(-1, 2), target.reshape(-1).long())
