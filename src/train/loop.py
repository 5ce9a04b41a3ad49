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

from src import metrics
from src.causal import warn_if_constants_cannot_learn
from src.data import load_splits
from src.train import checkpoint as ckpt_io
from src.train.build import build_model, compile_model, make_optimizer
from src.train.config import dump_config, model_signature
from src.train.distributed import Context, barrier
from src.train.evaluate import autocast, evaluate, iterate_batches, main_prediction, to_device, unwrap

log = logging.getLogger("causalmer")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffle of one epoch, a pure function of (seed, epoch): a resumed run replays it exactly."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def load_data(cfg: dict):
    data = cfg["data"]
    return load_splits(data["dir"], cfg["dataset"], aligned=data["aligned"], task=data["task"],
                       clean_nonfinite=data["clean_nonfinite"])


def make_model(cfg: dict, dataset, device: torch.device) -> torch.nn.Module:
    return build_model(cfg, dataset.dims, dataset.seq_lens, dataset.output_dim).to(device)


def train(cfg: dict, run_dir: Path, ctx: Context, seed: int, resume: bool = False, amp: bool = False) -> dict:
    """Train (or resume) the run in run_dir; return the final metrics dict written to metrics.json."""
    tcfg = cfg["train"]
    seed_everything(seed)
    splits = load_data(cfg)
    model = make_model(cfg, splits["train"], ctx.device)
    if cfg["model"]["name"] == "causalmer" and ctx.is_main:
        warn_if_constants_cannot_learn(splits["train"].output_dim, log)
    optimizer = make_optimizer(model, tcfg)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="min", factor=tcfg["plateau"]["factor"], patience=tcfg["plateau"]["patience"])
    state = {"epoch": 0, "best_loss": math.inf, "best_score": -math.inf, "since_best": 0, "history": []}
    signature = model_signature(cfg)

    if resume:
        last = ckpt_io.load_checkpoint(run_dir / ckpt_io.CHECKPOINT_NAMES["last"])
        ckpt_io.check_compatible(last, run_dir / "last.pt", signature, model_signature)
        ckpt_io.load_model_state(model, last["model"], run_dir / "last.pt")
        ckpt_io.load_optimizer_state(optimizer, last["optimizer"], run_dir / "last.pt")
        scheduler.load_state_dict(last["scheduler"])
        state = last["state"]
        ckpt_io.set_rng_state(last["rng"])
        log.info("resumed from %s after epoch %d", run_dir / "last.pt", state["epoch"])

    # `run` is `model` compiled (train.compile) or `model` itself; `trained` adds the DDP wrapper.
    # Checkpoints are written from and loaded into `model`, so their keys never depend on either.
    run = compile_model(model) if tcfg.get("compile") else model
    trained = run
    if ctx.distributed:
        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        trained = torch.nn.parallel.DistributedDataParallel(run, device_ids=ids, find_unused_parameters=True)

    prediction = main_prediction(model)
    headline_key, _ = metrics.headline(splits["train"].task)
    config_text = dump_config(cfg)
    for epoch in range(state["epoch"] + 1, tcfg["epochs"] + 1):
        started = time.time()
        train_loss = train_epoch(trained, optimizer, splits["train"], tcfg, ctx, seed, epoch, amp)
        valid = evaluate(trained, splits["valid"], tcfg["eval_batch_size"], ctx, amp=amp)
        scheduler.step(valid["loss"])
        score = valid["predictions"][prediction][headline_key]
        entry = {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid["loss"],
                 f"valid_{headline_key}": score, "lr": optimizer.param_groups[0]["lr"],
                 "seconds": round(time.time() - started, 2)}
        state["history"].append(entry)
        state["epoch"] = epoch
        improved_loss = valid["loss"] < state["best_loss"]
        improved_score = score > state["best_score"]
        state["since_best"] = 0 if improved_loss else state["since_best"] + 1
        if ctx.is_main:
            weights = {"model": model.state_dict(), "config": config_text, "epoch": epoch}
            if improved_loss:
                state["best_loss"] = valid["loss"]
                ckpt_io.atomic_save(weights, run_dir / ckpt_io.CHECKPOINT_NAMES["best_loss"])
            if improved_score:
                state["best_score"] = score
                ckpt_io.atomic_save(weights, run_dir / ckpt_io.CHECKPOINT_NAMES["best_acc"])
            # `last` is written after the best ones: a run killed in between resumes this epoch's end
            # from the previous `last` and rewrites both, so they never disagree with it.
            ckpt_io.atomic_save({**weights, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                 "rng": ckpt_io.rng_state(), "state": state},
                                run_dir / ckpt_io.CHECKPOINT_NAMES["last"])
        else:
            state["best_loss"] = min(state["best_loss"], valid["loss"])
            state["best_score"] = max(state["best_score"], score)
        log.info("epoch %d | train loss %.4f | valid loss %.4f | valid %s (%s) %.4f%s%s | %.1fs", epoch, train_loss,
                 valid["loss"], headline_key, prediction, score, " *loss" if improved_loss else "",
                 " *score" if improved_score else "", entry["seconds"])
        barrier(ctx)
        if tcfg.get("early_stop") and state["since_best"] >= tcfg["early_stop"]:
            log.info("early stop: %d epochs without a better validation loss", state["since_best"])
            break

    return final_evaluation(model, splits, cfg, run_dir, ctx, amp, state, run=run)


def train_epoch(model, optimizer, dataset, tcfg: dict, ctx: Context, seed: int, epoch: int, amp: bool) -> float:
    model.train()
    order = epoch_order(len(dataset), seed, epoch)
    # Each rank takes an equal strided share; the few samples beyond a multiple of world_size wait for
    # the next epoch's shuffle (evaluation, unlike training, sees every sample exactly once).
    usable = len(order) - len(order) % ctx.world_size
    indices = order[ctx.rank:usable:ctx.world_size]
    batch_size, accumulate = tcfg["batch_size"], tcfg.get("accumulate", 1)
    n_batches = math.ceil(len(indices) / batch_size)
    total, count = torch.zeros((), device=ctx.device), 0
    optimizer.zero_grad(set_to_none=True)
    bar = tqdm(iterate_batches(dataset, indices, batch_size), total=n_batches, desc=f"epoch {epoch}",
               leave=False, disable=None if ctx.is_main else True)
    for step, batch in enumerate(bar, start=1):
        batch = to_device(batch, ctx.device)
        with autocast(ctx.device, amp):
            out = model(batch["text"], batch["audio"], batch["vision"])
            loss = unwrap(model).loss(out, batch["target"])
        (loss / accumulate).backward()
        if step % accumulate == 0 or step == n_batches:
            if tcfg.get("grad_clip_value"):
                torch.nn.utils.clip_grad_value_(model.parameters(), tcfg["grad_clip_value"])
            if tcfg.get("grad_clip_norm"):
                torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg["grad_clip_norm"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        n = len(batch["target"])
        total += loss.detach() * n  # summed on the device: no host sync per step
        count += n
    return float(total) / max(1, count)


def final_evaluation(model, splits, cfg, run_dir: Path, ctx: Context, amp: bool, state: dict, run=None) -> dict:
    """Evaluate the best-validation-loss and best-validation-score checkpoints on valid and test.

    The checkpoints load into `model`; `run` (default `model`) is what evaluates: `model` itself or
    its compiled wrapper, which shares its parameters."""
    run = model if run is None else run
    batch_size = cfg["train"]["eval_batch_size"]
    results = {"history": state["history"]}
    for which in ("best_loss", "best_acc"):
        path = run_dir / ckpt_io.CHECKPOINT_NAMES[which]
        saved = ckpt_io.load_checkpoint(path)
        ckpt_io.load_model_state(model, saved["model"], path)
        results[which] = {"epoch": saved["epoch"]}
        for split in ("valid", "test"):
            results[which][split] = evaluate(run, splits[split], batch_size, ctx, amp=amp)
    if ctx.is_main:
        ckpt_io.atomic_write_text(json.dumps(results, indent=2), run_dir / "metrics.json")
    return results
