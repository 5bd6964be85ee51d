"""Relation phrases, and captions with them masked.

A caption such as "the red circle left of the blue square" names its own relation, so
a relation head that reads it could score by reading the word instead of the image.
The relation head therefore reads the caption with every relation phrase replaced by
one mask word (:data:`RELATION_MASK`): it still learns which two objects the caption
is about, and has to find their placement in the image. The other heads (matching,
box) read the whole caption.

The phrase list covers the synthetic scenes' phrasings and the usual English ways of
saying the six relations; a phrase is matched as whole words, case-insensitively,
longest first (so "to the left of" is masked as one phrase, not "left" alone).
"""

from __future__ import annotations

import re

# The word every relation phrase becomes; the same for all six relations, so it
# carries no information about which one.
RELATION_MASK = "[rel]"

# Phrases that state one of the six relations (left, right, above, below, inside,
# outside), or half of one. Extra words masked cost little; a phrase left visible leaks
# the label.
RELATION_PHRASES: tuple[str, ...] = (
    # left / right
    "to the left of",
    "on the left of",
    "on the left side of",
    "to the left side of",
    "left of",
    "left",
    "leftmost",
    "to the right of",
    "on the right of",
    "on the right side of",
    "to the right side of",
    "right of",
    "right",
    "rightmost",
    # above / below
    "on top of",
    "above",
    "over",
    "atop",
    "higher than",
    "up from",
    "top",
    "below",
    "beneath",
    "under",
    "underneath",
    "lower than",
    "down from",
    "bottom",
    # inside / outside
    "inside of",
    "inside",
    "in",
    "into",
    "within",
    "enclosed by",
    "surrounded by",
    "outside of",
    "outside",
    "out of",
    "beyond",
    "apart from",
    "away from",
)

_PATTERN = re.compile(
    r"\b(?:" + "|".join(re.escape(p).replace(r"\ ", r"\s+") for p in sorted(RELATION_PHRASES, key=len, reverse=True)) + r")\b",
    re.IGNORECASE,
)


def mask_relation(text: str) -> str:
    """``text`` with every relation phrase replaced by :data:`RELATION_MASK`."""
    return _PATTERN.sub(RELATION_MASK, text)


__all__ = ["RELATION_MASK", "RELATION_PHRASES", "mask_relation"]
