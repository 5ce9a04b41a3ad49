"""Evaluate a trained run's checkpoint on a split: its scores, or the missing-modality sweep, written into
the run directory (eval_*.json and confusion_*.png, or robustness_*.json)."""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from ..atomic import write_text
from ..errors import UserError
from ..run import checkpoint as ckpt_io
from ..run import distributed
from ..run.build import compile_model
from ..run.rundir import exclusive
from ..run.trained import load_run, other_data_line, pick_split, provenance, result_tag
from ..eval.metrics import STORED_UNITS
from ..eval.evaluate import parse_removal, predict, removal_sweep, score_predictions
from ..eval.tables import prediction_table, print_removal_report
from ..eval.predictions import predict_all, prediction_file, write_predictions
from ..analysis.confusion import confusion_matrices, write_confusion_png
from ..analysis.plots import PLOTS_HINT
from .analyze import analyze_runs


def check_run_flags(run_dir: Path, expected: list) -> None:
    """Refuse evaluation flags that describe another run than the one in `run_dir`.

    `expected`: (dotted config key, value, the flag that asked for it), e.g. ("data.aligned", False,
    "--unaligned"), from the training flags that inference.sh passes through to eval. Each must agree
    with the run's config.yaml: the run is evaluated as it was trained, never reconfigured."""
    path = Path(run_dir) / "config.yaml"
    if not expected or not path.is_file():
        return  # load_run says what is missing
    saved = ckpt_io.read_config_file(path)

    def agrees(found, wanted) -> bool:  # a mapping asks for its keys only, as --set merges it
        if isinstance(wanted, dict):
            return isinstance(found, dict) and all(agrees(found.get(k), v) for k, v in wanted.items())
        return found == wanted

    for key, value, flag in expected:
        node = saved
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if not agrees(node, value):
            raise UserError(f"{flag} asks for {key} = {value!r}, but the run in {run_dir} was trained with "
                            f"{key} = {node!r} ({path}); evaluation uses the run's own config, so drop the flag or "
                            "name the run that was trained with it")


def evaluate_run(run_dir: Path, checkpoint: str = "best_acc", split: str = "test", remove: str | None = None,
                 device: str = "auto", amp: bool = False, data_dir: str | None = None, analyze: bool = False,
                 compiled: bool = False, dataset: str | None = None, save_predictions: bool = False,
                 data_file: str | None = None, data_format: str | None = None) -> dict:
    """Score a run's checkpoint; `compiled` (or the run's train.compile) evaluates it torch.compiled;
    `analyze` adds the modality analysis (analyze_runs) of the same checkpoint; `dataset`, when given, is
    the dataset the run must be of; `save_predictions` also writes every per-sample output
    (src/eval/predictions.py); `data_file` (read as `data_format`) evaluates on another file."""
    ctx = distributed.setup(device)
    distributed.warn_if_amp_ignored(ctx.device, amp)
    try:
        cfg, splits, model, saved = load_run(run_dir, checkpoint, ctx.device, data_dir, dataset, data_file,
                                             data_format)
        if compiled or cfg["train"]["compile"]:
            model = compile_model(model)  # the weights were loaded into the module it wraps
        dataset = pick_split(splits, split)
        batch_size = cfg["train"]["eval_batch_size"]
        origin = provenance(run_dir, checkpoint, saved, dataset)
        if ctx.is_main and other_data_line(origin):
            print(other_data_line(origin))
        tag = result_tag(run_dir, checkpoint, data_dir, dataset.source, saved.get("run"), data_file)
        name = Path(checkpoint).stem
        # The results are written into the run directory: not while a training run is writing there.
        with exclusive(run_dir) if ctx.is_main else contextlib.nullcontext():
            if remove == "sweep":
                report = removal_sweep(model, dataset, batch_size, ctx, amp=amp)
                if ctx.is_main:
                    print(f"missing-modality test on {split} ({name}, epoch {saved['epoch']}); scores in %:")
                    print_removal_report(report)
                    out = Path(run_dir) / f"robustness_{tag}_{split}.json"
                    write_text(out, json.dumps({"units": STORED_UNITS, **origin, **report}, indent=2))
                    print(f"\nwrote {out}")
                result = report
            else:
                removed = parse_removal(remove)
                if save_predictions:
                    pred = predict_all(model, dataset, batch_size, ctx, remove=removed, amp=amp)
                else:
                    pred = predict(model, dataset, batch_size, ctx, remove=removed, amp=amp)
                result = {"loss": pred["loss"], "predictions": score_predictions(pred, dataset.task)}
                if ctx.is_main:
                    what = f", without {' and '.join(removed)}" if removed else ""
                    print(f"{cfg['dataset']} {split} split ({name}, epoch {saved['epoch']}{what}):")
                    print(prediction_table(result["predictions"]))
                    suffix = f"_no_{remove}" if remove else ""
                    matrices = confusion_matrices(pred, dataset.task)
                    confusion = {prediction: counts.tolist() for prediction, counts in matrices.items()}
                    out = Path(run_dir) / f"eval_{tag}_{split}{suffix}.json"
                    write_text(out, json.dumps({"units": STORED_UNITS, **origin, "removed": list(removed), **result,
                                                "confusion": confusion}, indent=2))
                    print(f"wrote {out}")
                    if save_predictions:
                        saved_to = write_predictions(prediction_file(run_dir, tag, tag == "best_acc", split, suffix),
                                                     pred, dataset)
                        print(f"wrote {saved_to}")
                    png = write_confusion_png(matrices, dataset.task, Path(run_dir) / f"confusion_{tag}_{split}{suffix}.png",
                                              f"{cfg['dataset']} {split} ({name}, epoch {saved['epoch']}{what})")
                    print(f"plots skipped: {PLOTS_HINT}" if png is None else f"wrote {png}")
        if analyze:
            analyze_runs([Path(run_dir)], checkpoint=checkpoint, split=split, device=device, data_dir=data_dir,
                         data_file=data_file, data_format=data_format)
        return result
    finally:
        distributed.teardown(ctx)


