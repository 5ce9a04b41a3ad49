"""The training loop: one run = one config, one seed, one directory.

Read top to bottom: seed -> data -> model -> optimiser -> (resume) -> epochs of train + validate +
checkpoint -> test evaluation of the two selected checkpoints. Selection uses the validation split only;
the test split is touched once, at the end.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..eval import metrics
from ..atomic import write_text
from ..causal import warn_if_constants_cannot_learn
from ..data import TRAINING_SPLITS, UNIMODAL_KEYS, require_splits
from ..errors import ConfigError, NonFiniteError
from ..run import checkpoint as ckpt_io
from ..models.engine import resolve_engine
from ..run import identity as run_identity
from .accumulation import Accumulation, refuse_if_no_step
from .missing import check_missing, drop_modalities, epoch_keep_masks
from ..run.build import compile_model, load_data, make_model, make_optimizer
from ..run.config import dump_config, model_signature
from ..run.distributed import Context, barrier
from ..run.published import init_from_published
from ..eval.evaluate import autocast, evaluate, iterate_batches, main_prediction, to_device, unwrap
from .tracking import make_logger, require_logger

log = logging.getLogger("causalmer")
PROGRESS_SECONDS = 60.0  # without a terminal, a progress line this often (train --progress-every)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffle of one epoch, a pure function of (seed, epoch): a resumed run replays it exactly."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def evaluated_splits(splits: dict) -> list[str]:
    """What a finished run is scored on: valid, then every split of the file beyond train and valid."""
    return ["valid"] + [name for name in splits if name not in TRAINING_SPLITS]


def check_unimodal_labels(cfg: dict, dataset) -> None:
    if not cfg["loss"]["unimodal_labels"]:
        return
    if cfg["model"]["name"] != "causalmer":
        raise ConfigError("loss.unimodal_labels trains CausalMER's unimodal branches on their own labels; the "
                          "backbone alone has no branches (use --model causalmer, or leave it false)")
    if not dataset.unimodal_targets:
        raise ConfigError(f"loss.unimodal_labels needs a label per modality in the data file, and "
                          f"{dataset.source['path']} has none (CH-SIMS files hold them: regression_labels_T/_A/_V)")


def prepare(cfg: dict, ctx: Context, seed: int, resume: bool = False, run_dir: Path | None = None) -> dict:
    """Seed, open the data, build the model and its optimiser: everything a mistake in the input can
    break, done before the run directory is created, so a refused run leaves nothing behind. `run_dir`:
    where the run will be, whose logger folder must be writable."""
    tcfg = cfg["train"]
    require_logger(tcfg["logger"], run_dir)
    check_missing(tcfg)
    seed_everything(seed)
    splits = load_data(cfg)
    require_splits(splits, TRAINING_SPLITS, "training")
    check_unimodal_labels(cfg, splits["train"])
    per_rank = len(splits["train"]) // ctx.world_size  # as train_epoch shares an epoch out
    refuse_if_no_step(Accumulation(tcfg["accumulation"], tcfg["accumulate"],
                                   math.ceil(per_rank / tcfg["batch_size"])))
    model = make_model(cfg, splits["train"], ctx.device)
    if cfg["model"].get("init_from") and not resume:  # a resumed run's weights come from last.pt
        init_from_published(model, cfg["model"]["init_from"], cfg["dataset"])
    optimizer = make_optimizer(model, tcfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=tcfg["plateau"]["factor"], patience=tcfg["plateau"]["patience"])
    return {"splits": splits, "model": model, "optimizer": optimizer, "scheduler": scheduler}


def train(cfg: dict, run_dir: Path, ctx: Context, seed: int, resume: bool = False, amp: bool = False,
          prepared: dict | None = None, progress_seconds: float = PROGRESS_SECONDS) -> dict:
    """Train (or resume) the run in run_dir; return the final metrics dict written to metrics.json.

    `prepared` is what prepare(cfg, ctx, seed) returned, when the caller has already checked the input.
    `progress_seconds`: without a terminal, a progress line this often (see ProgressLog)."""
    tcfg = cfg["train"]
    prepared = prepared or prepare(cfg, ctx, seed, resume)
    splits, model = prepared["splits"], prepared["model"]
    optimizer, scheduler = prepared["optimizer"], prepared["scheduler"]
    if cfg["model"]["name"] == "causalmer" and ctx.is_main:
        warn_if_constants_cannot_learn(splits["train"].output_dim, log)
    state = {"epoch": 0, "best_loss": math.inf, "best_acc": -math.inf, "since_best": 0, "history": []}
    signature = model_signature(cfg)
    # What every checkpoint of this run records: its id, seed and data file (src/run/identity.py).
    identity = (run_identity.bind_run(run_dir, seed, splits["train"].source, resume, training_engine(model, ctx.device))
                if ctx.is_main else None)

    if resume:
        last = ckpt_io.load_checkpoint(run_dir / ckpt_io.CHECKPOINT_NAMES["last"], resumable=True)
        ckpt_io.check_compatible(last, run_dir / "last.pt", signature)
        run_identity.check_own_checkpoint(last, run_dir / "last.pt", run_dir, "last", identity)
        ckpt_io.load_model_state(model, last["model"], run_dir / "last.pt")
        ckpt_io.load_optimizer_state(optimizer, last["optimizer"], run_dir / "last.pt")
        ckpt_io.load_scheduler_state(scheduler, last["scheduler"], run_dir / "last.pt")
        state = last["state"]
        ckpt_io.restore_rng_state(last["rng"], run_dir / "last.pt")
        log.info("resumed from %s after epoch %d", run_dir / "last.pt", state["epoch"])

    # `run` is `model` compiled (train.compile) or `model` itself; `trained` adds the DDP wrapper.
    # Checkpoints are written from and loaded into `model`, so their keys never depend on either.
    run = compile_model(model) if tcfg["compile"] else model
    trained = run
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(run, device_ids=ids, find_unused_parameters=True)

    prediction = main_prediction(model)
    headline_key, _ = metrics.headline(splits["train"].task)
    config_text = dump_config(cfg)
    logger = make_logger(tcfg["logger"], run_dir, ctx.is_main, first_epoch=state["epoch"] + 1, cfg=cfg)
    unit = " (%)" if metrics.is_fraction_metric(headline_key) else ""
    log.info("each epoch: mean training loss, validation loss, validation %s%s of the %s prediction; *loss marks a "
             "new best validation loss (best_loss.pt written), *score a new best validation %s (best_acc.pt written)",
             headline_key, unit, prediction, headline_key)
    for epoch in range(state["epoch"] + 1, tcfg["epochs"] + 1):
        started = time.time()
        train_loss, train_terms = train_epoch(trained, optimizer, splits["train"], tcfg, ctx, seed, epoch, amp,
                                              progress_seconds)
        train_seconds = time.time() - started
        valid = evaluate(trained, splits["valid"], tcfg["eval_batch_size"], ctx, amp=amp, margins=True)
        stop_if_nonfinite(valid["loss"], "validation loss", epoch)
        scheduler.step(valid["loss"])
        score = valid["predictions"][prediction][headline_key]
        entry = {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid["loss"],
                 f"valid_{headline_key}": score, "lr": optimizer.param_groups[0]["lr"],
                 "seconds": round(time.time() - started, 2)}
        entry.update(epoch_details(model, optimizer, valid, headline_key, train_terms,
                                   trained_samples(len(splits["train"]), ctx) / max(train_seconds, 1e-9)))
        state["history"].append(entry)
        state["epoch"] = epoch
        improved_loss = valid["loss"] < state["best_loss"]
        improved_score = score > state["best_acc"]
        state["since_best"] = 0 if improved_loss else state["since_best"] + 1
        if ctx.is_main:
            weights = ckpt_io.weights_record(model, config_text, epoch, identity, splits["train"].dims)
            if improved_loss:
                state["best_loss"] = valid["loss"]
                ckpt_io.atomic_save(weights, run_dir / ckpt_io.CHECKPOINT_NAMES["best_loss"])
            if improved_score:
                state["best_acc"] = score
                ckpt_io.atomic_save(weights, run_dir / ckpt_io.CHECKPOINT_NAMES["best_acc"])
            # `last` is written after the best ones: a run killed in between resumes this epoch's end
            # from the previous `last` and rewrites both, so they never disagree with it.
            ckpt_io.atomic_save({**weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                 "rng": ckpt_io.rng_state(), "state": state},
                                run_dir / ckpt_io.CHECKPOINT_NAMES["last"])
        else:
            state["best_loss"] = min(state["best_loss"], valid["loss"])
            state["best_acc"] = max(state["best_acc"], score)
        log.info("epoch %d | train loss %.4f | valid loss %.4f | valid %s (%s) %s%s%s | %.1fs", epoch, train_loss,
                 valid["loss"], headline_key, prediction, f"{100 * score:.2f}%" if unit else f"{score:.4f}",
                 " *loss" if improved_loss else "", " *score" if improved_score else "", entry["seconds"])
        logger.log_epoch(entry)
        barrier(ctx)
        if tcfg["early_stop"] is not None and state["since_best"] >= tcfg["early_stop"]:
            log.info("early stop: %d epochs without a better validation loss", state["since_best"])
            break

    results = final_evaluation(model, splits, cfg, run_dir, ctx, amp, state, run=run, identity=identity)
    logger.log_final(results, cfg, headline_key)
    logger.close()
    return results


def training_engine(model, device) -> str | None:
    """The engine the backbone's encoders train with on `device` ("auto" resolved), or None for a backbone
    that has no engine choice."""
    engine = getattr(unwrap(model).backbone, "engine", None)
    return None if engine is None else resolve_engine(engine, device)


def trained_samples(n: int, ctx: Context) -> int:
    """Training samples one epoch sees over all ranks (train_epoch leaves out n mod world_size)."""
    return n - n % ctx.world_size


def epoch_details(model, optimizer, valid: dict, headline_key: str, train_terms: dict,
                  samples_per_second: float) -> dict:
    """What a history entry keeps beyond the headline numbers, for the curves and the logger."""
    details = {"train_terms": train_terms,
               "valid_scores": {headline_key: {name: values[headline_key]
                                               for name, values in valid["predictions"].items()}},
               "lrs": {group.get("name", str(i)): group["lr"] for i, group in enumerate(optimizer.param_groups)},
               "samples_per_second": round(samples_per_second, 2)}
    constants = unwrap(model).constants()
    if constants:
        details["constants"] = {f"c_{letter}": float(value.detach()) for letter, value in constants.items()}
    if valid.get("margins") is not None:
        details["margins"] = valid["margins"]
    return details


def train_step(model, optimizer, batch: dict, tcfg: dict, device: torch.device, amp: bool = False,
               loss_scale: float = 1.0, clip: bool = True, update: bool = True) -> dict:
    """One training batch: forward, the loss's parts, backward of their sum times `loss_scale`; then, as
    the accumulation plan says, clip the gradients as the config asks (`clip`) and step the optimiser and
    clear the gradients (`update`).

    `model` is what trains: the module, its torch.compile wrapper (train.compile) or its DDP wrapper;
    the loss comes from the module underneath, outside the compiled graph. `amp` runs the forward and
    the loss under the bf16 autocast on CUDA (--amp). Returns the loss's parts, detached (their sum is
    the loss). Every training step of the benchmarks (benchmarks/speed.py, gpu.py, engines.py) is this
    function, so what they measure is what training does.
    """
    with autocast(device, amp):
        out = model(batch["text"], batch["audio"], batch["vision"])
        # Files with a label per modality (CH-SIMS) hand them on: the model uses them under loss.unimodal_labels.
        unimodal = {key: batch[key] for key in UNIMODAL_KEYS if key in batch}
        terms = unwrap(model).loss_terms(out, batch["target"], *([unimodal] if unimodal else []))
        loss = sum(terms.values())  # = model.loss
    (loss * loss_scale).backward()
    if clip:
        clip_gradients(model, tcfg)
    if update:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {key: value.detach() for key, value in terms.items()}


def train_epoch(model, optimizer, dataset, tcfg: dict, ctx: Context, seed: int, epoch: int,
                amp: bool, progress_seconds: float = PROGRESS_SECONDS) -> tuple[float, dict]:
    """One epoch of training; returns the mean loss per sample and the mean of each of its parts."""
    model.train()
    order = epoch_order(len(dataset), seed, epoch)
    # Each rank takes an equal strided share; the few samples beyond a multiple of world_size wait for
    # the next epoch's shuffle (evaluation, unlike training, sees every sample exactly once).
    usable = len(order) - len(order) % ctx.world_size
    indices = order[ctx.rank:usable:ctx.world_size]
    batch_size = tcfg["batch_size"]
    n_batches = math.ceil(len(indices) / batch_size)
    plan = Accumulation(tcfg["accumulation"], tcfg["accumulate"], n_batches)
    total, count, term_totals = torch.zeros((), device=ctx.device), 0, {}
    first_bad = torch.zeros((), dtype=torch.long, device=ctx.device)  # first step with a NaN/inf loss, 0: none
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(iterate_batches(dataset, indices, batch_size), total=n_batches, desc=f"epoch {epoch}",
               leave=False, disable=None if ctx.is_main else True)
    # tqdm turns itself off without a terminal (disable=None); then plain lines say how the epoch goes.
    progress = ProgressLog(epoch, n_batches, progress_seconds) if ctx.is_main and bar.disable else None
    keep = epoch_keep_masks(len(dataset), tcfg, seed, epoch)
    for step, batch in enumerate(bar, start=1):
        batch = to_device(batch, ctx.device)
        if keep is not None:
            batch = drop_modalities(batch, keep[indices[(step - 1) * batch_size:step * batch_size]])
        terms = train_step(model, optimizer, batch, tcfg, ctx.device, amp, loss_scale=plan.loss_scale,
                           clip=plan.clips_after(step), update=plan.steps_after(step))
        loss = sum(terms.values())
        first_bad = note_nonfinite(first_bad, loss, step)
        n = len(batch["target"])
        total += loss * n  # summed on the device: no host sync per step
        for key, value in terms.items():
            term_totals[key] = term_totals.get(key, 0) + value * n
        count += n
        if progress is not None:
            progress.update(step, count * ctx.world_size)
    optimizer.zero_grad(set_to_none=True)  # a partial window that did not step is discarded
    stop_if_nonfinite(float(total), "training loss", epoch, step=int(first_bad), n_batches=n_batches)
    return float(total) / max(1, count), {key: float(value) / max(1, count) for key, value in term_totals.items()}


class ProgressLog:
    """An epoch's progress as a plain log line every `every` seconds, for logs nobody watches live (nohup,
    a batch scheduler), where tqdm's bar is off: step, samples per second (over all ranks) and the
    epoch's remaining time. `every` <= 0 turns it off."""

    def __init__(self, epoch: int, n_batches: int, every: float, clock=time.monotonic):
        self.epoch, self.n_batches, self.every, self.clock = epoch, n_batches, every, clock
        self.started = self.last = clock()

    def update(self, step: int, samples: int) -> bool:
        """Called after each step with the samples seen so far; returns whether it logged a line."""
        now = self.clock()
        if self.every <= 0 or now - self.last < self.every or step >= self.n_batches:
            return False
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        remaining = elapsed / step * (self.n_batches - step)
        log.info("epoch %d | step %d/%d | %.1f samples/s | epoch ETA %s", self.epoch, step, self.n_batches,
                 samples / elapsed, duration(remaining))
        return True


def duration(seconds: float) -> str:
    """1h02m, 4m05s, 12s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def clip_gradients(model, tcfg: dict) -> None:
    # null: no clip (the schema refuses 0 and negative values)
    if tcfg["grad_clip_value"] is not None:
        torch.nn.utils.clip_grad_value_(model.parameters(), tcfg["grad_clip_value"])
    if tcfg["grad_clip_norm"] is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip_norm"])


def note_nonfinite(first_bad: torch.Tensor, loss: torch.Tensor, step: int) -> torch.Tensor:
    """The first step whose loss is NaN or inf, kept on the device so that no step waits for the host."""
    return torch.where((first_bad == 0) & ~torch.isfinite(loss.detach()), step, first_bad)


def stop_if_nonfinite(value: float, what: str, epoch: int, step: int = 0, n_batches: int = 0) -> None:
    """End the run at the first NaN/inf loss, before this epoch's checkpoints replace the last good ones."""
    if math.isfinite(value):
        return
    where = f"epoch {epoch}, step {step} of {n_batches}" if step else f"epoch {epoch}"
    kept = (f"the checkpoints of epoch {epoch - 1}, the last good one, are kept" if epoch > 1 else
            "no checkpoint was written, so the run may simply be started again")
    raise NonFiniteError(
        f"training stopped: the {what} is not finite (NaN or inf) at {where}; {kept}. To try again: a lower "
        "learning rate (--set train.lr.backbone=...), gradient clipping (--set train.grad_clip_norm=1.0), "
        "or check the data for NaN/inf (--clean-nonfinite replaces them by 0); a changed config needs another "
        "--name, since --resume continues only the same config")


def final_evaluation(model, splits, cfg, run_dir: Path, ctx: Context, amp: bool, state: dict, run=None,
                     identity: dict | None = None) -> dict:
    """Evaluate the best-validation-loss and best-validation-score checkpoints on valid and every split of
    the file beyond train and valid (test, test_ood, ...).

    The checkpoints load into `model`; `run` (default `model`) is what evaluates: `model` itself or
    its compiled wrapper, which shares its parameters. With the run's `identity`, a checkpoint another
    run wrote (copied in while this one trained) is refused rather than reported as this run's."""
    run = model if run is None else run
    batch_size = cfg["train"]["eval_batch_size"]
    # Which file every number below came from: the data as it was when the run opened it.
    results = {"units": metrics.STORED_UNITS, "data": splits["valid"].source, "history": state["history"]}
    for which in ("best_loss", "best_acc"):
        path = run_dir / ckpt_io.CHECKPOINT_NAMES[which]
        saved = ckpt_io.load_checkpoint(path)
        if identity is not None:
            run_identity.check_own_checkpoint(saved, path, run_dir, which, identity)
        ckpt_io.load_model_state(model, saved["model"], path)
        results[which] = {"epoch": saved["epoch"], "checkpoint": str(path)}
        for split in evaluated_splits(splits):
            results[which][split] = evaluate(run, splits[split], batch_size, ctx, amp=amp)
    if ctx.is_main:
        write_text(run_dir / "metrics.json", json.dumps(results, indent=2))
    return results
