"""Decision margins and confusion matrices: hand-made examples, agreement with the metrics, PNGs."""
import numpy as np
import pytest

from src.eval import metrics
from src.analysis.confusion import confusion_matrices, emotion_confusions, sentiment_confusion, write_confusion_png
from src.eval.margins import decision_margins

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def head_outputs(rng, n, classes):
    return {key: rng.normal(size=(n, classes)) for key in ("nde_t", "nde_a", "nde_v", "logits_te", "logits_tie")}


def test_binary_margins_are_the_present_minus_absent_gap():
    out = {key: np.zeros((2, 8)) for key in ("nde_t", "nde_a", "nde_v", "logits_te", "logits_tie")}
    # sample 0: neutral pair (1, 4) -> 3; a constant shift of every logit changes nothing
    out["nde_t"][0, :2] = [1.0, 4.0]
    out["nde_a"] += 5.0
    out["logits_te"][:, 1::2] = 1.0        # every pair says "present" by 1
    out["logits_tie"][:, 1::2] = 1.0
    out["logits_tie"][1, 6:8] = [2.0, 0.0]  # one of 8 decisions flips
    result = decision_margins(out, "binary")
    assert result["text"] == pytest.approx(3.0 / 8)
    assert result["audio"] == 0.0 and result["vision"] == 0.0
    assert result["te"] == pytest.approx(1.0)
    assert result["tie_te_flip_rate"] == pytest.approx(1 / 8)


def test_binary_margins_match_the_pairwise_definition_on_random_outputs():
    rng = np.random.default_rng(0)
    out = head_outputs(rng, 50, 8)
    result = decision_margins(out, "binary")

    def margin(x):
        pairs = x.reshape(len(x), -1, 2)
        return pairs[..., 1] - pairs[..., 0]

    assert result["vision"] == pytest.approx(np.abs(margin(out["nde_v"])).mean())
    assert result["te"] == pytest.approx(np.abs(margin(out["logits_te"])).mean())
    flips = np.mean(np.sign(margin(out["logits_tie"])) != np.sign(margin(out["logits_te"])))
    assert result["tie_te_flip_rate"] == pytest.approx(flips)


def test_class_margins_span_the_seven_logits_and_regression_has_none():
    out = {key: np.zeros((1, 7)) for key in ("nde_t", "nde_a", "nde_v", "logits_te", "logits_tie")}
    out["nde_a"][0] = [0, 1, 2, -3, 0, 0, 0]
    out["logits_te"][0, 2] = 1.0
    out["logits_tie"][0, 5] = 1.0
    result = decision_margins(out, "cls")
    assert result["audio"] == 5.0 and result["te"] == 1.0 and result["tie_te_flip_rate"] == 1.0
    assert decision_margins({k: v[:, :1] for k, v in out.items()}, "regression") is None
    assert decision_margins({"logits_te": out["logits_te"]}, "cls") is None  # the backbone alone


def test_sentiment_confusion_counts_a_hand_made_example():
    truth = [-3.0, -2.6, 0.4, 0.5, 1.5, 2.9, 3.0, 2.2]
    pred = [-4.0, -1.0, 0.0, 0.0, 2.0, 3.0, 2.4, 1.6]
    counts = sentiment_confusion(pred, truth)
    expected = np.zeros((7, 7), dtype=int)
    # (true class, predicted class): -3/-3 (clipped), -3/-1, 0/0, 0/0 (0.5 rounds to 0), 2/2 (1.5 rounds to 2),
    # 3/3, 3/2, 2/2
    for t, p in ((-3, -3), (-3, -1), (0, 0), (0, 0), (2, 2), (3, 3), (3, 2), (2, 2)):
        expected[t + 3, p + 3] += 1
    np.testing.assert_array_equal(counts, expected)
    assert np.trace(counts) / counts.sum() == pytest.approx(metrics.sentiment_metrics(pred, truth)["acc7"])


def test_emotion_confusions_count_a_hand_made_example():
    logits = np.zeros((3, 8))
    logits[0, 1] = 1.0   # neutral present
    logits[1, 3] = 1.0   # happy present
    target = np.array([[1, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 1]])
    counts = emotion_confusions(logits, target)
    np.testing.assert_array_equal(counts[0], [[1, 0], [1, 1]])   # neutral: rows true absent/present
    np.testing.assert_array_equal(counts[1], [[2, 1], [0, 0]])   # happy: predicted once, never true
    np.testing.assert_array_equal(counts[3], [[1, 0], [2, 0]])   # angry: true twice, never predicted
    np.testing.assert_array_equal(emotion_confusions(logits, np.eye(2)[target]), counts)  # one-hot layout


@pytest.mark.parametrize("task", ["binary", "cls", "regression"])
def test_confusion_diagonals_are_the_tables_accuracies(task, tmp_path):
    rng = np.random.default_rng(1)
    n = 40
    if task == "binary":
        pred = {"logits_tie": rng.normal(size=(n, 8)), "logits_m": rng.normal(size=(n, 8)),
                "target": rng.integers(0, 2, size=(n, 4))}
    else:
        score = rng.uniform(-3, 3, size=n)
        logits = rng.normal(size=(n, 7)) if task == "cls" else rng.uniform(-3.5, 3.5, size=(n, 1))
        target = np.round(score) + 3 if task == "cls" else score
        pred = {"logits_tie": logits, "logits_m": logits[::-1].copy(), "target": target, "score": score}
    matrices = confusion_matrices(pred, task)
    assert set(matrices) == {"tie", "m"}
    for name, key in (("tie", "logits_tie"), ("m", "logits_m")):
        scores = metrics.compute_metrics(pred[key], pred["target"], task, score=pred.get("score"))
        counts = matrices[name]
        assert counts.sum() == (4 * n if task == "binary" else n)
        if task == "binary":
            for index, emotion in enumerate(metrics.EMOTIONS):
                assert np.trace(counts[index]) / n == pytest.approx(scores[f"{emotion}_acc"])
        else:
            assert np.trace(counts) / n == pytest.approx(scores["acc7"])
    png = write_confusion_png(matrices, task, tmp_path / "confusion.png", "test")
    assert png.read_bytes()[:8] == PNG_MAGIC
