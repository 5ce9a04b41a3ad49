"""The three modalities, in the one order used everywhere outside a backbone's internals.

Data keys, batch keys, branch names, removal letters and report columns all follow this order
(text, audio, vision). A backbone may order them differently inside (DMD uses l, v, a); that order
stays in its module.
"""
import itertools

MODALITIES = ("text", "audio", "vision")
# Single-letter names: removal keys (`--remove ta`), the head's constants (`constant_t`), compact labels.
LETTERS = {"text": "t", "audio": "a", "vision": "v"}

# The missing-modality test's removals: key ("t", ..., "av") -> the modalities zeroed. Every non-empty
# proper subset (at least one modality stays), by size, each in MODALITIES order.
REMOVALS = {
    "".join(LETTERS[m] for m in removed): frozenset(removed)
    for size in range(1, len(MODALITIES))
    for removed in itertools.combinations(MODALITIES, size)
}
