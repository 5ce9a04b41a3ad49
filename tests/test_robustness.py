"""Robustness measures without training: effect scaling, missing-modality masks, bootstrap, bias subsets."""
import json

import numpy as np
import pytest
import torch

from src.causal.head import CausalHead
from src.data import load_splits
from src.errors import ConfigError, UserError
from src.eval import metrics
from src.eval.stats import paired_interval
from src.eval.missing import check_rate, keep_masks, uniform_keep_masks, zero_missing
from src.eval.robustness import ALPHA_GRID, alpha_curves, auilc, scaled_logits, select_alpha
from src.eval.subsets import bias_subsets, file_subsets, probe_predictions
from src.modalities import MODALITIES
from src.train.missing import check_missing, drop_modalities, epoch_keep_masks


def head_predictions(fusion="mask", classes=8, n=64, seed=0):
    """The head's outputs as a predictions file holds them, with constants away from their initial 0."""
    torch.manual_seed(seed)
    head = CausalHead(fusion)
    with torch.no_grad():
        for name, value in (("constant_t", 0.3), ("constant_a", -0.7), ("constant_v", 1.1)):
            getattr(head, name).fill_(value)
        out = head(*(torch.randn(n, classes) * 3 for _ in range(4)))
    keys = {"logits_te": "logits_te", "logits_tie": "logits_tie", "logits_te_effect": "te", "logits_nde": "nde",
            "logits_nde_t": "nde_t", "logits_nde_a": "nde_a", "logits_nde_v": "nde_v"}
    return {key: out[source].numpy() for key, source in keys.items()}


@pytest.mark.parametrize("fusion", ["mask", "sum", "hm", "tanh"])
def test_effect_scaling_is_te_at_zero_and_tie_at_one_exactly(fusion):
    pred = head_predictions(fusion)
    assert np.array_equal(scaled_logits(pred, 0.0), pred["logits_te"])
    assert np.array_equal(scaled_logits(pred, 1.0), pred["logits_tie"])
    # In between it decides as TE − α·NDE: the two differ by one number for every class.
    for alpha in (0.5, 2.0):
        shift = scaled_logits(pred, alpha) - (pred["logits_te_effect"] - alpha * pred["logits_nde"])
        assert np.allclose(shift, shift[:, :1], atol=1e-4)
        for letter in "tav":
            single = scaled_logits(pred, alpha, {"t": "text", "a": "audio", "v": "vision"}[letter])
            shift = single - (pred["logits_te_effect"] - alpha * pred[f"logits_nde_{letter}"])
            assert np.allclose(shift, shift[:, :1], atol=1e-4)


def test_alpha_curve_endpoints_score_as_te_and_tie_and_selection_prefers_the_smallest_best():
    pred = {**head_predictions(), "target": np.random.default_rng(0).integers(0, 2, (64, 4))}
    curves = alpha_curves(pred, "binary", ALPHA_GRID, {"half": np.arange(32)})
    assert curves["all"][0] == metrics.compute_metrics(pred["logits_te"], pred["target"], "binary")["avg_acc"]
    assert curves["all"][4] == metrics.compute_metrics(pred["logits_tie"], pred["target"], "binary")["avg_acc"]
    assert curves["subsets"]["half"][0] == metrics.compute_metrics(pred["logits_te"][:32], pred["target"][:32],
                                                                   "binary")["avg_acc"]
    assert select_alpha([0.5, 0.7, 0.7, 0.6], (0, 1, 2, 3)) == 1
    assert select_alpha([None, None], (0, 1)) is None


@pytest.mark.parametrize("task", ["binary", "cls", "regression"])
def test_per_sample_headline_averages_to_the_headline(task):
    rng = np.random.default_rng(1)
    n = 50
    if task == "binary":
        logits, target, score = rng.normal(size=(n, 8)), rng.integers(0, 2, (n, 4)), None
    else:
        score = np.round(rng.uniform(-3, 3, n) * 3) / 3
        target = (np.round(np.clip(score, -3, 3)) + 3).astype(int) if task == "cls" else score
        logits = rng.normal(size=(n, 7)) if task == "cls" else rng.normal(size=(n, 1)) * 2
    key, _ = metrics.headline(task)
    per_sample = metrics.headline_hits(logits, target, task, score)
    assert per_sample.mean() == pytest.approx(metrics.compute_metrics(logits, target, task, score)[key], abs=1e-12)


def test_bootstrap_of_a_predictor_against_itself_is_exactly_zero_and_seeded():
    scores = np.random.default_rng(2).random(200)
    assert paired_interval(scores, scores, rounds=300) == {"difference": 0.0, "low": 0.0, "high": 0.0,
                                                           "rounds": 300, "n": 200}
    better = np.clip(scores + 0.2, 0, 1)
    first, again = paired_interval(better, scores, rounds=300), paired_interval(better, scores, rounds=300)
    assert first == again and 0 < first["low"] <= first["difference"] <= first["high"]


def test_missing_masks_keep_one_modality_follow_the_rate_and_repeat_from_their_seed():
    keep = keep_masks(20000, 0.5, np.random.default_rng(3))
    assert keep.any(axis=1).all()
    # P(dropped) = η, except where all three were dropped and one came back: η − η³/3.
    assert (~keep).mean() == pytest.approx(0.5 - 0.125 / 3, abs=0.01)
    assert keep_masks(10, 0.0, np.random.default_rng(0)).all()
    assert np.array_equal(keep_masks(50, 0.3, np.random.default_rng(4)), keep_masks(50, 0.3, np.random.default_rng(4)))
    uniform = uniform_keep_masks(20000, 0.9, np.random.default_rng(5))
    assert uniform.any(axis=1).all() and 0.45 < uniform.all(axis=1).mean() < 0.7  # half complete, some by chance
    for bad in (1.0, -0.1, float("nan"), True):
        with pytest.raises(UserError, match="rate in"):
            check_rate(bad, "--rates")


def test_zeroing_a_modality_by_mask_is_exactly_removing_it():
    inputs = [torch.randn(4, 3, 5) for _ in MODALITIES]
    keep = torch.tensor([[True, False, True]] * 4)
    masked = zero_missing(inputs, keep)
    assert torch.equal(masked[0], inputs[0]) and torch.equal(masked[2], inputs[2])
    assert torch.equal(masked[1], torch.zeros_like(inputs[1]))


def test_training_masks_are_a_function_of_seed_and_epoch_and_zero_the_batch():
    tcfg = {"missing_rate": 0.4, "missing_schedule": "fixed"}
    first = epoch_keep_masks(100, tcfg, seed=1, epoch=3)
    assert np.array_equal(first, epoch_keep_masks(100, tcfg, seed=1, epoch=3))  # a resumed run redraws these
    assert not np.array_equal(first, epoch_keep_masks(100, tcfg, seed=1, epoch=4))  # redrawn each epoch
    assert not np.array_equal(first, epoch_keep_masks(100, tcfg, seed=2, epoch=3))
    assert epoch_keep_masks(100, {"missing_rate": 0.0}, seed=1, epoch=3) is None  # off by default
    batch = {m: torch.ones(100, 2, 3) for m in MODALITIES}
    dropped = drop_modalities(batch, first)
    for i, m in enumerate(MODALITIES):
        assert torch.equal(dropped[m][:, 0, 0] == 1, torch.from_numpy(first[:, i]))
    for bad, match in (({"missing_rate": 1.0}, "train.missing_rate"), ({"missing_schedule": "sometimes"},
                                                                       "train.missing_schedule")):
        with pytest.raises(ConfigError, match=match):
            check_missing({**tcfg, **bad})


def test_auilc_is_the_trapezoid_area():
    assert auilc([0, 0.5, 1.0], [1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert auilc([0.0], [1.0]) is None


@pytest.fixture(scope="module")
def biased_splits(synthetic_data):
    return load_splits(synthetic_data(scale=0.01, bias_modality="audio", bias_strength=0.9), "iemocap")


def test_probe_sees_no_test_labels_and_subsets_repeat(biased_splits, synthetic_data):
    train, test = biased_splits["train"], biased_splits["test"]
    before = probe_predictions(train, test, "audio")
    original = test.targets
    try:
        test.targets = original[np.random.default_rng(0).permutation(len(original))]
        assert np.array_equal(probe_predictions(train, test, "audio"), before)
    finally:
        test.targets = original
    again = load_splits(synthetic_data(scale=0.01, bias_modality="audio", bias_strength=0.9), "iemocap")
    subsets = bias_subsets(train, test)
    assert subsets == bias_subsets(again["train"], again["test"])
    for m in MODALITIES:
        assert sorted(subsets[f"aligned_{m}"] + subsets[f"conflicting_{m}"]) == list(range(len(test)))
    # The planted shortcut is clean in train and random in test: the audio probe misleads on most test rows.
    assert len(subsets["conflicting_audio"]) > len(subsets["aligned_audio"])


def test_a_subsets_file_with_foreign_rows_or_ids_is_refused(biased_splits, tmp_path):
    test = biased_splits["test"]
    path = tmp_path / "subsets.json"
    path.write_text(json.dumps({"mine": [0, 2, 2]}))
    assert file_subsets(path, test) == {"mine": [0, 2]}
    for content, match in (({"mine": [0, len(test)]}, "outside"), ({"mine": ["nobody"]}, "ids"),
                           ({"mine": [0.5]}, "row indices or of sample ids"), ([1, 2], "one JSON object")):
        path.write_text(json.dumps(content))
        with pytest.raises(UserError, match=match):
            file_subsets(path, test)
    path.write_text("{not json")
    with pytest.raises(UserError, match="cannot read it as JSON"):
        file_subsets(path, test)


def test_summaries_over_seeds_average_robustness_figures_and_test_the_pairs(tmp_path):
    from src.analysis.summary import summarize

    tie, te = [0.61, 0.58, 0.66], [0.55, 0.57, 0.60]
    runs = []
    for seed, (a, b) in enumerate(zip(tie, te), start=1):
        run = tmp_path / f"seed{seed}"
        (run / "robustness").mkdir(parents=True)
        (run / "metrics.json").write_text(json.dumps({"best_acc": {"test": {"tie": {"avg_acc": a}}}}))
        interval = {"difference": a - b, "low": 0.0, "high": 0.1, "n": 10, "rounds": 5}
        (run / "robustness" / "robustness.json").write_text(json.dumps({
            "metric": "avg_acc", "accuracy": {"all": {"tie": a, "te": b}}, "missing": {"auilc": {"tie": 0.4}},
            "alpha": {"selected": 1.0}, "bootstrap": {"intervals": {"tie-te": {"all": interval}}}}))
        runs.append(run)
    rows = {row["metric"]: row for row in summarize({"causal": runs})}
    assert rows["robustness/all/tie/avg_acc"]["mean"] == pytest.approx(np.mean(tie))
    assert rows["robustness/all/tie-te/avg_acc_difference"]["std"] == pytest.approx(np.std(np.subtract(tie, te), ddof=1))
    differences = np.subtract(tie, te)
    t = differences.mean() / (differences.std(ddof=1) / np.sqrt(3))
    assert rows["robustness/all/tie-te/paired_t"]["mean"] == pytest.approx(t)
    assert 0 < rows["robustness/all/tie-te/paired_p"]["mean"] < 1 and rows["robustness/all/tie-te/paired_p"]["n"] == 3


def test_unimodal_label_and_word_subsets_follow_their_definitions():
    from types import SimpleNamespace

    from src.eval.subsets import unimodal_subsets, word_subsets

    split = SimpleNamespace(task="cls", targets=np.array([0, 6, 3, 3]), scores=None,
                            unimodal_targets={"label_t": np.array([0, 6, 2, 3]), "label_a": np.array([1, 6, 3, 3])})
    subsets = unimodal_subsets(split)
    assert subsets["conflicting_text_label"] == [2] and subsets["aligned_text_label"] == [0, 1, 3]
    assert subsets["conflicting_audio_label"] == [0] and "conflicting_vision_label" not in subsets
    assert unimodal_subsets(SimpleNamespace(task="cls", targets=np.zeros(2), scores=None)) == {}

    # Per-class counts over train: "great" (0, 2) and "good" (4, 5) vary enough (cv 1 and 0.11 ≥ 0.1) to
    # carry the label of their larger count; "nice" (5, 6, cv 0.09) and "the" (1, 1, cv 0) do not.
    texts = {6: ["great", "the great"] + ["good nice"] * 5 + ["nice"], 0: ["good nice"] * 4 + ["nice", "the"]}
    train = SimpleNamespace(task="cls", targets=np.array([6] * 8 + [0] * 6), scores=None,
                            raw_text=texts[6] + texts[0][:-1] + ["the"])
    test = SimpleNamespace(task="cls", targets=np.array([6, 6, 0, 3, 0, 0]), scores=None,
                           raw_text=["Great!", "the the great the", "nice the", "GREAT", "good", "nice, nice"])
    assert word_subsets(train, test) == {"aligned_words": [0, 1], "conflicting_words": [3, 4]}
    assert word_subsets(SimpleNamespace(raw_text=None), test) == {}
