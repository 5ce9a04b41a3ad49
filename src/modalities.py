"""The three modalities, in the one order used everywhere outside a backbone's internals.

Data keys, batch keys, branch names, removal letters and report columns all follow this order
(text, audio, vision). A backbone may order them differently inside (DMD uses l, v, a); that order
stays in its module.
"""
import itertools

MODALITIES = ("text", "audio", "vision")
# Single-letter names: removal keys (`--remove ta`), the head's constants (`constant_t`), compact labels.
LETTERS = {"text": "t", "audio": "a", "vision": "v"}
# The batch key of a sample's label for one modality alone (data with a label per modality, CH-SIMS).
LABEL_KEYS = {modality: f"label_{letter}" for modality, letter in LETTERS.items()}

# Every subset of the modalities (8), from the empty one to all three, by size, each size in
# MODALITIES order: the presence subsets of the contribution analysis.
SUBSETS: tuple[frozenset, ...] = tuple(
    frozenset(combination)
    for size in range(len(MODALITIES) + 1)
    for combination in itertools.combinations(MODALITIES, size)
)

# The missing-modality test's removals: key ("t", ..., "av") -> the modalities zeroed. Every non-empty
# proper subset (at least one modality stays), in the order of SUBSETS.
REMOVALS = {
    "".join(LETTERS[m] for m in MODALITIES if m in removed): removed
    for removed in SUBSETS
    if 0 < len(removed) < len(MODALITIES)
}
