"""`eval --save-predictions` and `robustness` end to end on two tiny trained runs (CausalMER and MulT alone)."""
import json

import numpy as np
import pytest
import torch
import yaml

import main
from src.run.trained import load_run
from src.eval import metrics
from src.eval.evaluate import predict
from src.eval.predictions import read_predictions, score_file
from src.eval.robustness import scaled_logits
from src.run.distributed import Context
from tests.helpers import copy_run, run

pytestmark = pytest.mark.slow

TINY = ["--set", "model.backbone_params.d_model=10", "--set", "model.backbone_params.layers=1",
        "--set", "model.branches.text={kind: pool}", "--set", "model.branches.audio={kind: pool}",
        "--set", "model.branches.vision={kind: pool}", "--set", "train.batch_size=16",
        "--set", "train.eval_batch_size=16"]
FAST = ["--rates", "0", "0.5", "--draws", "2", "--bootstrap", "50"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Data with an audio shortcut; a CausalMER run trained with missing modalities, and MulT alone."""
    root = tmp_path_factory.mktemp("robust")
    data, runs_dir = root / "data", root / "runs"
    assert main.main(["make-data", "--dataset", "iemocap", "--data-dir", str(data), "--scale", "0.015",
                      "--bias-modality", "audio", "--bias-strength", "0.9"]) == 0
    common = ["--dataset", "iemocap", "--data-dir", str(data), "--runs-dir", str(runs_dir), "--device", "cpu",
              "--epochs", "2", *TINY]
    assert main.main(["train", *common, "--name", "causal", "--set", "train.missing_rate=0.3"]) == 0
    assert main.main(["train", *common, "--name", "alone", "--model", "mult"]) == 0
    return {"data": data, "runs": runs_dir, "causal": runs_dir / "iemocap" / "causal" / "seed1",
            "alone": runs_dir / "iemocap" / "alone" / "seed1"}


def robustness(capsys, runs, name, *extra):
    return run(capsys, "robustness", "--dataset", "iemocap", "--name", name, "--runs-dir", runs["runs"],
               "--data-dir", runs["data"], "--device", "cpu", *FAST, *extra)


def test_training_with_missing_modalities_is_recorded_in_the_config(runs):
    saved = yaml.safe_load((runs["causal"] / "config.yaml").read_text())
    assert saved["train"]["missing_rate"] == 0.3


def test_saved_predictions_recompute_every_metric_of_the_evaluation(capsys, runs):
    code, out, err = run(capsys, "eval", "--dataset", "iemocap", "--name", "causal", "--runs-dir", runs["runs"],
                         "--data-dir", runs["data"], "--device", "cpu", "--save-predictions")
    assert code == 0, err
    pred = read_predictions(runs["causal"] / "predictions_test.npz")
    assert {"index", "target", "logits_tie", "logits_te", "logits_m", "logits_t", "logits_a", "logits_v",
            "logits_te_effect", "logits_nde", "logits_nde_t", "logits_nde_a", "logits_nde_v"} <= set(pred)
    assert np.array_equal(pred["index"], np.arange(len(pred["target"])))
    saved = json.loads((runs["causal"] / "eval_best_acc_test.json").read_text())
    assert score_file(pred, "binary") == saved["predictions"]
    # Each array is the model's own output of that name, row by row.
    ctx = Context(rank=0, world_size=1, device=torch.device("cpu"))
    _, splits, model, _ = load_run(runs["causal"], "best_acc", ctx.device, str(runs["data"]))
    expected = {"tie": "logits_tie", "te": "logits_te", "m": "logits_m", "t": "logits_t", "a": "logits_a",
                "v": "logits_v", "te_effect": "te", "nde": "nde", "nde_t": "nde_t", "nde_a": "nde_a", "nde_v": "nde_v"}
    outputs = predict(model, splits["test"], 7, ctx, keys=tuple(expected.values()))
    for key, output in expected.items():
        assert np.allclose(pred[f"logits_{key}"], outputs[output], atol=1e-6), key
    assert np.array_equal(pred["target"], splits["test"].targets)


def test_every_accuracy_of_the_result_is_recomputed_from_the_predictions(capsys, runs):
    for name in ("causal", "alone"):
        assert run(capsys, "eval", "--dataset", "iemocap", "--name", name, "--runs-dir", runs["runs"], "--data-dir",
                   runs["data"], "--device", "cpu", "--save-predictions")[0] == 0
    code, out, err = robustness(capsys, runs, "causal", "--baseline", runs["alone"])
    assert code == 0, err
    folder = runs["causal"] / "robustness"
    result = json.loads((folder / "robustness.json").read_text())
    subsets = json.loads((folder / "subsets_test.json").read_text())["subsets"]
    pred = read_predictions(runs["causal"] / "predictions_test.npz")
    baseline = read_predictions(runs["alone"] / "predictions_test.npz")
    alpha = result["alpha"]["selected"]
    assert alpha in result["alpha"]["grid"]
    logits = {"m": pred["logits_m"], "te": pred["logits_te"], "tie": pred["logits_tie"],
              "tie_alpha": scaled_logits(pred, alpha), "baseline": baseline["logits_m"]}
    assert set(result["accuracy"]) == {"all", *subsets} and result["metric"] == "avg_acc"
    for subset, per_prediction in result["accuracy"].items():
        rows = np.arange(len(pred["target"])) if subset == "all" else np.asarray(subsets[subset]["rows"], dtype=int)
        assert set(per_prediction) == set(logits)
        for prediction, value in per_prediction.items():
            expected = (metrics.compute_metrics(logits[prediction][rows], pred["target"][rows], "binary")["avg_acc"]
                        if len(rows) else None)
            assert value == pytest.approx(expected, abs=1e-12), (subset, prediction)
    # At rate 0 nothing is missing: the curve starts at the plain evaluation, for every draw.
    for prediction, curve in result["missing"]["curves"].items():
        assert curve["mean"][0] == result["accuracy"]["all"][prediction] and curve["std"][0] == 0
    assert set(result["bootstrap"]["intervals"]) == {"tie-te", "tie_alpha-te", "tie-baseline"}
    assert (folder / "robustness.md").is_file()


def test_a_fixed_mask_is_the_removal_of_its_modalities(runs):
    ctx = Context(rank=0, world_size=1, device=torch.device("cpu"))
    _, splits, model, _ = load_run(runs["causal"], "best_acc", ctx.device, str(runs["data"]))
    test = splits["test"]
    plain = predict(model, test, 16, ctx)
    removed = predict(model, test, 16, ctx, remove=("audio", "vision"))
    kept = predict(model, test, 16, ctx, keep=np.tile([True, False, False], (len(test), 1)))
    everything = predict(model, test, 16, ctx, keep=np.ones((len(test), 3), dtype=bool))
    for key in ("logits_tie", "logits_te", "logits_m"):
        assert np.array_equal(kept[key], removed[key])
        assert np.array_equal(everything[key], plain[key])
    assert not np.array_equal(kept["logits_m"], plain["logits_m"])
    # Sample by sample: a mixed mask gives each row what removing its own missing modalities gives it.
    mixed = np.random.default_rng(0).random((len(test), 3)) < 0.5
    mixed[:, 0] |= ~mixed.any(axis=1)
    pred = predict(model, test, 16, ctx, keep=mixed)
    for pattern in np.unique(mixed, axis=0):
        rows = (mixed == pattern).all(axis=1)
        gone = tuple(m for m, kept_m in zip(("text", "audio", "vision"), pattern) if not kept_m)
        assert np.allclose(pred["logits_m"][rows], predict(model, test, 16, ctx, remove=gone)["logits_m"][rows],
                           atol=1e-6)


def test_subsets_do_not_depend_on_the_run_judged(capsys, runs):
    assert robustness(capsys, runs, "causal")[0] == 0
    assert robustness(capsys, runs, "alone")[0] == 0
    first, second = (json.loads((runs[n] / "robustness" / "subsets_test.json").read_text()) for n in ("causal", "alone"))
    assert first == second
    alone = json.loads((runs["alone"] / "robustness" / "robustness.json").read_text())
    assert alone["alpha"] is None and set(alone["predictions"]) == {"m"}


def test_bad_inputs_are_one_paragraph_errors(capsys, runs, tmp_path):
    bad_rows = tmp_path / "rows.json"
    bad_rows.write_text(json.dumps({"elsewhere": [0, 10_000]}))
    bad_ids = tmp_path / "ids.json"
    bad_ids.write_text(json.dumps({"elsewhere": ["nobody"]}))
    other = copy_run(runs["alone"], tmp_path / "runs", name="other")
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["data"]["aligned"] = False
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    for extra, fragment in ((["--subsets", bad_rows], "outside"), (["--subsets", bad_ids], "ids"),
                            (["--baseline", other], "trained on other data"), (["--rates", "0", "1"], "[0, 1)"),
                            (["--baseline", tmp_path / "none"], "no run directory")):
        code, out, err = robustness(capsys, runs, "causal", *extra)
        assert code == 2, (extra, err)
        assert "Traceback" not in err and fragment in err and err.count("\n") == 1, (extra, err)


def test_a_named_split_of_another_file_is_judged_apart_from_the_runs_own_result(capsys, runs, tmp_path):
    ood = tmp_path / "ood.pkl"
    assert main.main(["make-data", "--dataset", "iemocap", "--data-file", str(ood), "--scale", "0.015",
                      "--extra-split", "test_ood", "--seed", "3"]) == 0
    code, _, err = run(capsys, "robustness", "--dataset", "iemocap", "--name", "causal", "--runs-dir", runs["runs"],
                       "--data-file", ood, "--data-format", "mult", "--split", "test_ood", "--device", "cpu", *FAST)
    assert code == 0, err
    (out,) = runs["causal"].glob("robustness_best_acc-*")
    result = json.loads((out / "robustness.json").read_text())
    assert result["split"] == "test_ood" and result["data"]["path"] == str(ood.resolve())
    # α is chosen on the run's own validation split, not on the other file's
    assert result["alpha"]["selected_on"] == str(next(runs["data"].glob("*.pkl")).resolve())
    code, _, err = run(capsys, "robustness", "--dataset", "iemocap", "--name", "causal", "--runs-dir", runs["runs"],
                       "--data-file", ood, "--split", "test_iid", "--device", "cpu", *FAST)
    assert code == 2 and "test_iid" in err and "test_ood" in err, err
