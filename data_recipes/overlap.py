"""The one near-duplicate rule for every place contents meet: splits of a recipe, a user's clusters, and
the external benchmarks against what was trained on or used for directions.

Two texts are near copies when they are the same after normalisation, or when their sets of word stems
(words of three or more letters, function words dropped, cut to five letters) have Jaccard similarity
>= 0.45. Stems make inflected rewordings match ("a plan for disrupting transportation systems and causing
chaos" against "a plan to disrupt transportation systems and cause chaos"), keeping the frame's verbs
("write", "create") lets a different verb count as the small change it is, and 0.45 still tells apart
requests that share a template but not a target ("the legal definition of manslaughter" against "... of
human trafficking"). tests/test_recipes.py holds the planted paraphrases the threshold was set on.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter

NEAR_DUPLICATE_JACCARD = 0.45
RULE = f"same normalised text, or word-stem Jaccard >= {NEAR_DUPLICATE_JACCARD}"
FUNCTION_WORDS = frozenset(
    "the and for with into onto from that this these those what which who whom whose how why when where can "
    "could would should will shall may might must does did have has had was were are been being not you your "
    "yours our their them they its his her him she we me my mine any some all each about than then there here "
    "also just very".split()
)


def normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def content_id(text: str) -> str:
    return hashlib.sha256(normalise(text).encode()).hexdigest()[:16]


def stems(text: str) -> frozenset[str]:
    return frozenset(w[:5] for w in normalise(text).split() if len(w) >= 3 and w not in FUNCTION_WORDS)


def near_copies(a: str, b: str) -> bool:
    return content_id(a) == content_id(b) or _similar(stems(a), stems(b))


def _similar(a: frozenset[str], b: frozenset[str]) -> bool:
    union = len(a | b)
    return union > 0 and len(a & b) >= NEAR_DUPLICATE_JACCARD * union


class OverlapIndex:
    """Contents to compare against, indexed by stem so a lookup reads only the contents sharing one."""

    def __init__(self, contents: list[str] = ()):
        self.ids: set[str] = set()
        self.stem_sets: list[frozenset[str]] = []
        self.postings: dict[str, list[int]] = {}
        for text in contents:
            self.add(text)

    def add(self, text: str) -> None:
        self.ids.add(content_id(text))
        words = stems(text)
        for stem in words:
            self.postings.setdefault(stem, []).append(len(self.stem_sets))
        self.stem_sets.append(words)

    def overlaps(self, text: str) -> bool:
        if content_id(text) in self.ids:
            return True
        words = stems(text)
        shared = Counter(i for stem in words for i in self.postings.get(stem, ()))
        return any(_similar(words, self.stem_sets[i]) for i in shared)
