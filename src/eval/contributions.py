"""How much each modality contributes to a model, and how evenly.

Three views, all computed from quantities the evaluation already produces:

- **Shapley values** of the modalities: evaluate the model on the test set with only a subset S of
  (text, audio, vision) present (the others zeroed, as in the missing-modality test) to get a score
  v(S) for each of the 8 subsets. A modality's Shapley value is its marginal gain v(S ∪ {m}) − v(S)
  averaged over every order in which the modalities could be added. The values add up to
  v(all) − v(empty) (efficiency), a modality that never changes the score gets 0, and two modalities
  that are interchangeable get equal values.
- **NDE shares**: the causal head's natural direct effects NDE_t, NDE_a, NDE_v (docs/design.md § The causal
  head) measure how much each unimodal shortcut moves the prediction; the mean |NDE_m| over samples,
  normalised to sum to 1, is the share of the shortcut effect that each modality carries.
- **Balance index**: the normalised entropy of the absolute contributions (1 = perfectly even,
  0 = one modality carries everything).

Plus the **removal report** of the missing-modality test: each removal's score, its drop from the
full-input score, and the mean and standard deviation of the drops (the paper's robustness figure: a
model that leans on one modality has one large drop and a high standard deviation).
"""
from __future__ import annotations

import itertools
import math

import numpy as np

from ..modalities import LETTERS, MODALITIES, REMOVALS


def subset_label(subset) -> str:
    """A compact name for a presence subset: ``"t+a"``, ``"t+a+v"``; ``"none"`` for the empty set."""
    members = [LETTERS[m] for m in MODALITIES if m in subset]
    return "+".join(members) if members else "none"


def present_after_removal(removal: str) -> frozenset:
    """The modalities still present after a removal key such as ``"ta"``."""
    if removal not in REMOVALS:
        raise ValueError(f"unknown removal {removal!r}; expected one of {', '.join(REMOVALS)}")
    return frozenset(MODALITIES) - REMOVALS[removal]


def shapley_values(scores: dict, players: tuple[str, ...] = MODALITIES) -> dict[str, float]:
    """Exact Shapley value of each modality from the scores of all presence subsets.

    ``scores`` maps every subset of ``players`` (as a frozenset, or any iterable of names) to the
    score of the model evaluated with only those modalities present. With n players:

        phi_m = sum over S not containing m of |S|! (n - |S| - 1)! / n! * (v(S + m) - v(S))

    Returns ``{modality: phi}``; the values sum to v(all) - v(empty).
    """
    players = tuple(players)
    value = {frozenset(subset): float(score) for subset, score in scores.items()}
    expected = [
        frozenset(combination)
        for size in range(len(players) + 1)
        for combination in itertools.combinations(players, size)
    ]
    missing = [sorted(subset) for subset in expected if subset not in value]
    if missing:
        raise ValueError(f"Shapley values need the score of every subset; missing: {missing}")
    unknown = [sorted(subset) for subset in value if not subset <= set(players)]
    if unknown:
        raise ValueError(f"scores name modalities outside {players}: {unknown}")

    n = len(players)
    result = {}
    for player in players:
        others = [p for p in players if p != player]
        total = 0.0
        for size in range(n):
            # Weight of a coalition of this size: the share of orderings in which exactly it precedes `player`.
            weight = math.factorial(size) * math.factorial(n - size - 1) / math.factorial(n)
            for coalition in itertools.combinations(others, size):
                before = frozenset(coalition)
                total += weight * (value[before | {player}] - value[before])
        result[player] = total
    return result


def _flat_numpy(values) -> np.ndarray:
    if hasattr(values, "detach"):
        values = values.detach().cpu().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1)


def nde_shares(nde_t, nde_a, nde_v) -> dict[str, float]:
    """Each modality's share of the direct (shortcut) effect: mean |NDE_m|, normalised to sum to 1.

    Each argument is an array or tensor of any shape (typically (N, C) over a test set); the mean is
    over all its entries. When every NDE is zero (e.g. the ``mask`` fusion with its constants still at
    0, where every counterfactual outcome is 0) there is no effect to apportion and every share is nan.
    """
    magnitudes = {}
    for name, effect in zip(MODALITIES, (nde_t, nde_a, nde_v)):
        flat = _flat_numpy(effect)
        if flat.size == 0:
            raise ValueError(f"NDE of {name} is empty")
        magnitudes[name] = float(np.mean(np.abs(flat)))
    total = sum(magnitudes.values())
    if not (total > 0.0 and math.isfinite(total)):
        return {name: float("nan") for name in MODALITIES}
    return {name: magnitude / total for name, magnitude in magnitudes.items()}


def balance_index(values: dict[str, float]) -> float:
    """How evenly the contributions are spread: normalised entropy of |v_m| / sum |v|.

    B = -sum p_m log p_m / log n, with p_m = |v_m| / sum_k |v_k| and n the number of modalities (3):
    1 when every modality contributes equally, 0 when one carries everything. Absolute values are used
    because a Shapley value can be negative (a modality that hurts) and still counts as influence.

    Edge cases: nan when every contribution is 0 (there is nothing to balance, and reporting 1.0 would
    claim a perfectly balanced model that uses no modality at all), when any value is nan, or when
    fewer than two modalities are given.
    """
    magnitudes = np.abs(np.asarray([float(v) for v in values.values()], dtype=np.float64))
    if magnitudes.size < 2 or not np.isfinite(magnitudes).all():
        return float("nan")
    total = magnitudes.sum()
    if total == 0.0:
        return float("nan")
    shares = magnitudes[magnitudes > 0] / total
    entropy = float(-(shares * np.log(shares)).sum())
    return float(np.clip(entropy / math.log(magnitudes.size), 0.0, 1.0))


def removal_report(full_score: float, removal_scores: dict[str, float], higher_is_better: bool = True) -> dict:
    """The missing-modality test summarised: each removal's score and drop, and the spread of the drops.

    ``removal_scores`` maps removal keys (``t``, ``a``, ``v``, ``ta``, ``tv``, ``av``: the modalities
    zeroed) to the score obtained; any non-empty selection of them is accepted. The drop is how much
    worse the score got: full - score when higher is better (accuracy), score - full otherwise (MAE).

    Returns ``{"full_score", "removals": {key: {"score", "drop"}}, "drop_mean", "drop_std"}`` with
    removals in canonical order. ``drop_std`` is the **population** standard deviation (ddof=0): the
    removals are the complete set being described, not a sample from a larger one.
    """
    unknown = [key for key in removal_scores if key not in REMOVALS]
    if unknown:
        raise ValueError(f"unknown removal keys {unknown}; expected some of {', '.join(REMOVALS)}")
    if not removal_scores:
        raise ValueError("removal_report needs at least one removal score")
    full_score = float(full_score)
    sign = 1.0 if higher_is_better else -1.0
    removals = {}
    for key in REMOVALS:
        if key in removal_scores:
            score = float(removal_scores[key])
            removals[key] = {"score": score, "drop": sign * (full_score - score)}
    drops = np.asarray([entry["drop"] for entry in removals.values()], dtype=np.float64)
    return {
        "full_score": full_score,
        "removals": removals,
        "drop_mean": float(drops.mean()),
        "drop_std": float(drops.std(ddof=0)),
    }


def removal_scores_from_subsets(scores: dict) -> dict[str, float]:
    """Removal scores read off presence-subset scores (the same evaluations, indexed by what was removed)."""
    value = {frozenset(subset): float(score) for subset, score in scores.items()}
    return {key: value[present_after_removal(key)] for key in REMOVALS if present_after_removal(key) in value}
