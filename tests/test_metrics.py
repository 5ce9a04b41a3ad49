"""The metrics of docs/design.md § Metrics against hand-worked examples."""
import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from src.eval.metrics import (
    EMOTIONS,
    compute_metrics,
    format_table,
    format_value,
    headline,
    iemocap_metrics,
    predictions_to_scores,
    sentiment_metrics,
)


def _pair_logits(decisions: np.ndarray) -> np.ndarray:
    """(N, 4) present/absent decisions -> (N, 8) logits whose pairwise argmax reproduces them."""
    pairs = np.stack([1.0 - decisions, decisions.astype(np.float64)], axis=-1)  # (N, 4, 2)
    return pairs.reshape(len(decisions), 8)


# ---------------------------------------------------------------------------------------------------- IEMOCAP


def test_iemocap_hand_example():
    target = np.array([[1, 0, 0, 1], [0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 1]])
    decided = np.array([[1, 0, 0, 1], [0, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 1]])
    result = iemocap_metrics(_pair_logits(decided), target)

    # neutral: truth 1,0,1,0 vs 1,0,0,0 -> 3/4; F1(present) = 2/3, F1(absent) = 0.8, equal support.
    assert result["neutral_acc"] == pytest.approx(0.75)
    assert result["neutral_f1"] == pytest.approx((2 / 3 + 0.8) / 2)
    # happy: truth 0,0,1,0 vs 0,1,1,0 -> 3/4; sad and angry are perfect.
    assert result["happy_acc"] == pytest.approx(0.75)
    assert result["sad_acc"] == result["angry_acc"] == 1.0
    assert result["sad_f1"] == result["angry_f1"] == 1.0
    assert result["avg_acc"] == pytest.approx((0.75 + 0.75 + 1 + 1) / 4)
    assert result["avg_f1"] == pytest.approx(np.mean([result[f"{e}_f1"] for e in EMOTIONS]))
    assert set(result) == {f"{e}_{m}" for e in EMOTIONS for m in ("acc", "f1")} | {"avg_acc", "avg_f1"}


def test_iemocap_matches_sklearn_and_accepts_onehot_and_tensors():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(40, 8))
    target = rng.integers(0, 2, size=(40, 4))
    onehot = np.eye(2, dtype=np.int64)[target]  # the (N, 4, 2) layout of the data files
    from_tensors = iemocap_metrics(torch.from_numpy(logits), torch.from_numpy(onehot))
    expected = iemocap_metrics(logits, target)
    assert from_tensors == expected
    decided = logits.reshape(40, 4, 2).argmax(-1)
    assert expected["happy_f1"] == pytest.approx(f1_score(target[:, 1], decided[:, 1], average="weighted"))


def test_iemocap_rejects_bad_shapes():
    with pytest.raises(ValueError):
        iemocap_metrics(np.zeros((3, 7)), np.zeros((3, 4)))
    with pytest.raises(ValueError):
        iemocap_metrics(np.zeros((3, 8)), np.zeros((2, 4)))


# ---------------------------------------------------------------------------------------------------- sentiment

TRUTH = np.array([-2.6, -0.4, 0.0, 0.6, 2.5, 1.4])
PRED = np.array([-2.2, 0.2, 0.3, 1.4, 2.4, -0.2])


def test_sentiment_hand_example():
    result = sentiment_metrics(PRED, TRUTH)
    # acc7: rounded preds -2,0,0,1,2,0 vs truths -3,0,0,1,2(2.5 rounds to even),1 -> 4/6.
    assert result["acc7"] == pytest.approx(4 / 6)
    # acc5: clipping to [-2, 2] makes -2.6 and -2.2 agree -> 5/6.
    assert result["acc5"] == pytest.approx(5 / 6)
    # non-negative: truth F,F,T,T,T,T vs pred F,T,T,T,T,F -> 4/6; F1(non-neg) 3/4, F1(neg) 1/2.
    assert result["acc2_nonneg"] == pytest.approx(4 / 6)
    assert result["f1_nonneg_binary"] == pytest.approx(0.75)
    assert result["f1_nonneg_weighted"] == pytest.approx((4 * 0.75 + 2 * 0.5) / 6)
    # positive: the zero label is dropped; truth F,F,T,T,T vs pred F,T,T,T,F -> 3/5; F1 2/3 and 1/2.
    assert result["acc2_pos"] == pytest.approx(3 / 5)
    assert result["f1_pos_binary"] == pytest.approx(2 / 3)
    assert result["f1_pos_weighted"] == pytest.approx((3 * 2 / 3 + 2 * 0.5) / 5)
    assert result["mae"] == pytest.approx(3.8 / 6)
    assert result["corr"] == pytest.approx(np.corrcoef(PRED, TRUTH)[0, 1])


def test_acc2_pos_excludes_zero_labels():
    flipped = PRED.copy()
    flipped[2] = -0.3  # the sample whose true score is exactly 0
    before, after = sentiment_metrics(PRED, TRUTH), sentiment_metrics(flipped, TRUTH)
    assert after["acc2_pos"] == before["acc2_pos"]
    assert after["f1_pos_weighted"] == before["f1_pos_weighted"]
    assert after["acc2_nonneg"] == pytest.approx(before["acc2_nonneg"] - 1 / 6)


def test_acc2_pos_is_nan_when_every_label_is_zero():
    result = sentiment_metrics(np.array([0.5, -0.5]), np.zeros(2))
    assert np.isnan(result["acc2_pos"]) and np.isnan(result["f1_pos_binary"])
    assert result["acc2_nonneg"] == 0.5


def test_clipping_for_acc7_and_acc5():
    # 5.0 vs 3.0: both clip to 3 -> correct for acc7 and acc5.  2.7 vs 2.2: 3 vs 2 for acc7, 2 vs 2 for acc5.
    result = sentiment_metrics(np.array([5.0, 2.7]), np.array([3.0, 2.2]))
    assert result["acc7"] == 0.5
    assert result["acc5"] == 1.0
    # MAE is on the unclipped scores.
    assert result["mae"] == pytest.approx((2.0 + 0.5) / 2)


def test_constant_predictions_give_zero_corr_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = sentiment_metrics(np.full(5, 0.7), np.array([-1.0, 0.0, 1.0, 2.0, 0.5]))
        single = sentiment_metrics(np.array([1.0]), np.array([2.0]))
    assert result["corr"] == 0.0 and single["corr"] == 0.0
    assert np.isfinite(result["mae"])


def test_sentiment_rejects_mismatch_and_nonfinite():
    with pytest.raises(ValueError):
        sentiment_metrics(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError):
        sentiment_metrics(np.array([np.nan, 1.0]), np.zeros(2))


# ---------------------------------------------------------------------------------------------------- dispatch


def test_cls_scores_are_argmax_minus_three():
    logits = np.eye(7)[[0, 3, 6, 4]] * 5.0
    np.testing.assert_array_equal(predictions_to_scores(logits, "cls"), [-3.0, 0.0, 3.0, 1.0])
    np.testing.assert_array_equal(predictions_to_scores(np.array([[0.5], [-1.5]]), "regression"), [0.5, -1.5])
    with pytest.raises(ValueError):
        predictions_to_scores(np.zeros((2, 8)), "binary")
    with pytest.raises(ValueError):
        predictions_to_scores(np.zeros((2, 5)), "cls")


def test_compute_metrics_dispatch():
    logits = np.eye(7)[[0, 3, 6, 4]]
    classes = np.array([0, 3, 5, 4])  # truth scores -3, 0, 2, 1
    from_target = compute_metrics(logits, classes, "cls")
    assert from_target["acc7"] == 0.75
    # The raw score refines the truth: 0.3 rounds to class 3 but is positive for acc2_pos.
    with_score = compute_metrics(logits, classes, "cls", score=np.array([-3.0, 0.3, 2.0, 1.0]))
    assert from_target["acc2_pos"] == 1.0  # zero-label sample excluded
    assert with_score["acc2_pos"] == 0.75  # predicted 0 (not positive) for a positive truth

    regression = compute_metrics(np.array([[1.0], [-1.0]]), np.array([1.0, -1.0], dtype=np.float32), "regression")
    assert regression["acc7"] == 1.0 and regression["mae"] == 0.0

    target = np.array([[1, 0, 0, 1]])
    assert compute_metrics(_pair_logits(target), target, "binary")["avg_acc"] == 1.0
    with pytest.raises(ValueError):
        compute_metrics(logits, classes, "ordinal")


def test_headline():
    assert headline("binary") == ("avg_acc", True)
    assert headline("cls") == ("acc7", True)
    assert headline("regression") == ("acc7", True)


def test_format_table():
    table = format_table({
        "tie (debiased)": {"acc7": 0.501, "mae": 0.61234, "corr": 0.5},
        "m (backbone)": {"acc7": 0.4876, "mae": 0.7},
    })
    lines = table.splitlines()
    assert "tie (debiased)" in lines[0] and "m (backbone)" in lines[0]
    assert [line.split()[0] for line in lines[2:]] == ["acc7", "mae", "corr"]
    assert lines[2].split()[1:] == ["50.1", "48.8"]
    assert lines[3].split()[1:] == ["0.612", "0.700"]
    assert lines[4].split()[1:] == ["0.500", "-"]
    assert format_value("avg_f1", float("nan")) == "nan"
