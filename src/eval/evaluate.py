"""Evaluation: run a model over a split, gather every sample exactly once, and score it.

Every evaluation reports the predictions the model has, side by side: the debiased prediction
(`logits_tie`), the fused one (`logits_te`) and the backbone alone (`logits_m`).
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch

from . import metrics
from ..errors import UserError
from .missing import zero_missing
from ..modalities import LETTERS, MODALITIES, REMOVALS, SUBSETS
from ..run.distributed import Context, gather_objects
from .contributions import removal_report
from .margins import MARGIN_KEYS, decision_margins

PREDICTIONS = {"tie": "logits_tie", "te": "logits_te", "m": "logits_m"}
PREDICTION_KEYS = tuple(PREDICTIONS.values())


def parse_removal(text: str | None) -> tuple[str, ...]:
    """'tv' -> ('text', 'vision'); None or '' -> (). Letters t, a, v; each once; not all three."""
    if not text:
        return ()
    letters = list(text)
    known = set(LETTERS.values())
    if any(c not in known for c in letters) or len(set(letters)) != len(letters):
        raise UserError(f"--remove takes letters t, a, v (e.g. a, tv) or 'sweep', got '{text}'")
    if len(letters) == len(MODALITIES):
        raise UserError("--remove tav would remove every modality; remove at most two")
    return tuple(m for m in MODALITIES if LETTERS[m] in letters)


def iterate_batches(dataset, indices, batch_size: int):
    for start in range(0, len(indices), batch_size):
        yield dataset.get_batch(indices[start:start + batch_size])


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel (a compiled model forwards attributes itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


@torch.no_grad()
def predict(model, dataset, batch_size: int, ctx: Context, remove=(), amp: bool = False,
            keys=PREDICTION_KEYS, keep: np.ndarray | None = None) -> dict:
    """Outputs for every sample of `dataset`, in dataset order, on every rank.

    `remove` zeroes whole modalities; `keep`, an (N, 3) boolean mask over the dataset's rows
    (src/eval/missing.py), zeroes each sample's modalities it marks False.

    Ranks take disjoint strided shards (no padding samples), so after gathering each sample appears
    exactly once. Returns numpy arrays per output key present, plus `target`, `score` when the data has
    it, and `loss` (the mean over samples of model.validation_loss, the loss that selects checkpoints)."""
    model.eval()
    indices = np.arange(ctx.rank, len(dataset), ctx.world_size)
    outputs = {}
    loss_sum, count = 0.0, 0
    for start in range(0, len(indices), batch_size):
        rows = indices[start:start + batch_size]
        batch = to_device(dataset.get_batch(rows), ctx.device)
        inputs = [torch.zeros_like(batch[m]) if m in remove else batch[m] for m in MODALITIES]
        if keep is not None:
            inputs = zero_missing(inputs, torch.as_tensor(keep[rows], device=ctx.device))
        with autocast(ctx.device, amp):
            out = model(*inputs)
            loss = unwrap(model).validation_loss(out, batch["target"])
        n = len(batch["target"])
        loss_sum += float(loss) * n
        count += n
        for key in keys:
            if key in out:
                outputs.setdefault(key, []).append(out[key].float().cpu().numpy())
        outputs.setdefault("target", []).append(batch["target"].cpu().numpy())
        if "score" in batch:
            outputs.setdefault("score", []).append(batch["score"].cpu().numpy())
    local = {k: np.concatenate(v) for k, v in outputs.items()}
    local["index"] = indices
    parts = gather_objects((local, loss_sum, count), ctx)
    order = np.argsort(np.concatenate([p[0]["index"] for p in parts]))
    merged = {k: np.concatenate([p[0][k] for p in parts if k in p[0]])[order]
              for k in local if k != "index"}
    merged["loss"] = sum(p[1] for p in parts) / max(1, sum(p[2] for p in parts))
    return merged


def score_predictions(pred: dict, task: str) -> dict:
    """{prediction name: metrics} for each prediction present, plus the loss."""
    results = {}
    for name, key in PREDICTIONS.items():
        if key in pred:
            results[name] = metrics.compute_metrics(pred[key], pred["target"], task, score=pred.get("score"))
    return results


def evaluate(model, dataset, batch_size: int, ctx: Context, remove=(), amp: bool = False,
             margins: bool = False) -> dict:
    """Loss and metrics of every prediction; with `margins`, also the causal head's decision margins
    (src/eval/margins.py; None for the backbone alone and for regression)."""
    keys = PREDICTION_KEYS
    if margins:
        keys = tuple(dict.fromkeys(PREDICTION_KEYS + MARGIN_KEYS))
    pred = predict(model, dataset, batch_size, ctx, remove=remove, amp=amp, keys=keys)
    result = {"loss": pred["loss"], "predictions": score_predictions(pred, dataset.task)}
    if margins:
        result["margins"] = decision_margins(pred, dataset.task)
    return result


def main_prediction(model) -> str:
    """The prediction a run is judged by, as the model declares it: the debiased one (tie) for CausalMER,
    the backbone's (m) for the backbone alone."""
    return unwrap(model).main_prediction


def removal_sweep(model, dataset, batch_size: int, ctx: Context, amp: bool = False) -> dict:
    """Scores with each of the six removals, their drops from the full-input score, and the std of drops."""
    key, higher_is_better = metrics.headline(dataset.task)
    full = evaluate(model, dataset, batch_size, ctx, amp=amp)
    removals = {letters: evaluate(model, dataset, batch_size, ctx, remove=parse_removal(letters), amp=amp)
                for letters in REMOVALS}
    summary = {name: removal_report(full["predictions"][name][key],
                                    {r: removals[r]["predictions"][name][key] for r in REMOVALS},
                                    higher_is_better=higher_is_better)
               for name in full["predictions"]}
    return {"metric": key, "full": full, "removals": removals, "summary": summary}


def subset_scores(model, dataset, batch_size: int, ctx: Context, amp: bool = False) -> dict:
    """Headline score of each prediction for all 8 presence subsets (absent modalities zeroed)."""
    key, _ = metrics.headline(dataset.task)
    scores = {}
    for present in SUBSETS:
        removed = tuple(m for m in MODALITIES if m not in present)
        result = evaluate(model, dataset, batch_size, ctx, remove=removed, amp=amp)
        for name, values in result["predictions"].items():
            scores.setdefault(name, {})[present] = values[key]
    return scores
