"""What `diff` compares of a function, derived from one `Analysis`.

Everything here survives a rebuild that moves code and data: normalised
instruction tokens (no addresses), the strings and imports it uses, the local
functions it calls (as offsets, only meaningful once they are matched), and
cheap shape counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cached_property

from micropatch.tools.analysis import Analysis
from micropatch.tools.functions import Function


@dataclass(frozen=True)
class Profile:
    """The comparable facts of one function."""

    function: Function
    tokens: tuple[int, ...]
    exact: int
    callees: tuple[int, ...]  # called, or whose address is taken (a callback table)
    strings: frozenset[str]
    anchors: frozenset[str]
    blocks: int

    @property
    def size(self) -> int:
        """Number of instructions."""
        return len(self.tokens)

    @cached_property
    def bag(self) -> Counter[int]:
        """The tokens as a multiset; made only for the functions compared fuzzily."""
        return Counter(self.tokens)


def profile(analysis: Analysis) -> Profile:
    """The profile of one analysed function."""
    strings = frozenset(analysis.strings)
    return Profile(
        function=analysis.function,
        tokens=analysis.tokens,
        exact=hash(analysis.tokens),
        callees=tuple(dict.fromkeys(analysis.code_references)),
        strings=strings,
        anchors=strings | frozenset(analysis.imports),
        blocks=analysis.blocks,
    )


def bag_similarity(a: Profile, b: Profile) -> float:
    """Weighted Jaccard of the two token multisets, 0..1: cheap, order-blind."""
    if not a.bag and not b.bag:
        return 1.0
    small, large = (a.bag, b.bag) if len(a.bag) <= len(b.bag) else (b.bag, a.bag)
    common = sum(min(n, large.get(token, 0)) for token, n in small.items())
    return common / (a.size + b.size - common)


def fuzzy_score(a: Profile, b: Profile) -> float:
    """How alike two unmatched functions look, 0..1: their instructions mostly,
    with the strings and imports they share (or do not) weighing in."""
    score = bag_similarity(a, b)
    if a.anchors or b.anchors:
        shared = len(a.anchors & b.anchors) / len(a.anchors | b.anchors)
        score = 0.7 * score + 0.3 * shared
    blocks = min(a.blocks, b.blocks) / max(a.blocks, b.blocks)
    return 0.9 * score + 0.1 * blocks
