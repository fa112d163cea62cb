"""Matching the functions of two builds, then ranking the matched ones that changed.

The stages follow BinDiff and Diaphora, cheapest and surest first, each only
over what is still unmatched:

1. symbol names (several functions of one name, like two statics, pair by likeness);
2. identical normalised code, where that code is unique on both sides;
3. the set of strings and imports used, where that set is unique on both sides;
4. the call graph: the unmatched callees (and callers) of a matched pair pair up
   when they are alone, or in the same order and alike;
5. fuzzy likeness, only between functions of similar size (a sorted window,
   never all pairs), best pairs first; then the call graph again.

A matched pair whose normalised code differs is a change; `diff.rank` orders
the changes, taking turns between the order of an added check (changes of
logic in surely matched functions) and the order of novelty (the comparisons
and calls gained that few other changes gained). When most matched functions
changed (another compiler), `diff.churn` orders them by what a compiler keeps.
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from micropatch.tools.analysis import SMALL_CONSTANT, ModuleAnalysis
from micropatch.tools.diff.churn import by_outline, churned, outlines
from micropatch.tools.diff.features import Profile, bag_similarity, fuzzy_score, profile
from micropatch.tools.diff.rank import Change, change, rank
from micropatch.tools.functions import Function
from micropatch.tools.insn import Roles, Shapes

log = logging.getLogger(__name__)

FUZZY_THRESHOLD = 0.55
FUZZY_WINDOW = 40  # candidates either side in size order
SIZE_SLACK = 0.35  # a fuzzy candidate's size may differ by this fraction


@dataclass
class DiffResult:
    """The pairs (old start -> new start), how each was matched, and the ranked changes."""

    old: ModuleAnalysis
    new: ModuleAnalysis
    pairs: dict[int, int]
    how: dict[int, str]
    profiles_old: dict[int, Profile]
    profiles_new: dict[int, Profile]
    changes: list[Change] = field(default_factory=list)

    @property
    def matched(self) -> int:
        return len(self.pairs)

    @property
    def methods(self) -> Counter[str]:
        return Counter(self.how.values())

    @property
    def churned(self) -> bool:
        """Most matched functions changed: the builds differ throughout (another
        compiler, other flags), and the ranking cannot set a fix apart from that
        churn (docs/finding-the-site.md, "When most functions changed")."""
        return churned(len(self.changes), self.matched)

    @property
    def only_old(self) -> list[Function]:
        return [p.function for s, p in self.profiles_old.items() if s not in self.pairs]

    @property
    def only_new(self) -> list[Function]:
        taken = set(self.pairs.values())
        return [p.function for s, p in self.profiles_new.items() if s not in taken]


def diff_files(old: str | Path, new: str | Path) -> DiffResult:
    """`diff_modules` of two module files, decoded through one shared cache."""
    shapes = Shapes(SMALL_CONSTANT)
    old_index = ModuleAnalysis.open(old, shapes)
    new_index = ModuleAnalysis.open(new, shapes)
    old_index.analyses()
    new_index.analyses()
    shapes.clear()
    return diff_modules(old_index, new_index)


def diff_modules(old: ModuleAnalysis, new: ModuleAnalysis) -> DiffResult:
    """Match the functions of `old` and `new` and rank the changed ones."""
    result = DiffResult(
        old=old,
        new=new,
        pairs={},
        how={},
        profiles_old={a.function.start: profile(a) for a in old.analyses() if a.valid},
        profiles_new={a.function.start: profile(a) for a in new.analyses() if a.valid},
    )
    matcher = _Matcher(result)
    matcher.by_name()
    matcher.by_unique(lambda p: p.exact if p.size >= 3 else None, "exact")
    matcher.by_unique(lambda p: hash((p.strings, p.anchors)) if p.strings else None, "anchors")
    matcher.by_callgraph()
    matcher.by_unique(lambda p: p.exact, "exact")
    matcher.by_fuzzy()
    matcher.by_callgraph()
    log.info("matched %d functions: %s", result.matched, dict(result.methods))
    result.changes = _rank(result)
    return result


class _Matcher:
    def __init__(self, result: DiffResult) -> None:
        self.result = result
        self.old = result.profiles_old
        self.new = result.profiles_new
        self.taken: set[int] = set()
        self.callers_old = _callers(self.old.values())
        self.callers_new = _callers(self.new.values())

    def pair(self, a: int, b: int, how: str) -> bool:
        if a in self.result.pairs or b in self.taken:
            return False
        self.result.pairs[a] = b
        self.result.how[a] = how
        self.taken.add(b)
        return True

    def free_old(self) -> list[Profile]:
        return [p for s, p in self.old.items() if s not in self.result.pairs]

    def free_new(self) -> list[Profile]:
        return [p for s, p in self.new.items() if s not in self.taken]

    def by_name(self) -> None:
        groups_old = _group(self.old.values(), lambda p: p.function.name)
        groups_new = _group(self.new.values(), lambda p: p.function.name)
        for name, olds in groups_old.items():
            news = groups_new.get(name)
            if not news:
                continue
            if len(olds) == len(news) == 1:
                self.pair(olds[0].function.start, news[0].function.start, "name")
            else:
                self._greedy(olds, news, bag_similarity, "name", 0.0)

    def by_unique(self, key: Callable[[Profile], int | None], how: str) -> None:
        groups_old = _group(self.free_old(), key)
        groups_new = _group(self.free_new(), key)
        for value, olds in groups_old.items():
            news = groups_new.get(value)
            if news and len(olds) == len(news) == 1:
                self.pair(olds[0].function.start, news[0].function.start, how)

    def by_callgraph(self) -> None:
        queue = list(self.result.pairs.items())
        while queue:
            a, b = queue.pop()
            for olds, news in (
                (self.old[a].callees, self.new[b].callees),
                (self.callers_old.get(a, ()), self.callers_new.get(b, ())),
            ):
                paired = self.result.pairs
                free_old = [self.old[s] for s in olds if s in self.old and s not in paired]
                free_new = [self.new[s] for s in news if s in self.new and s not in self.taken]
                if not free_old or not free_new:
                    continue
                if len(free_old) == len(free_new) == 1:
                    # alone at the same place in the graph: weak likeness is enough
                    candidates = [(free_old[0], free_new[0])]
                    floor = 0.2
                elif len(free_old) == len(free_new):
                    candidates = list(zip(free_old, free_new, strict=True))
                    floor = 0.5
                else:
                    self._greedy(free_old, free_new, fuzzy_score, "callgraph", 0.6, queue)
                    continue
                for x, y in candidates:
                    close = _sizes_close(x, y) and fuzzy_score(x, y) >= floor
                    if close and self.pair(x.function.start, y.function.start, "callgraph"):
                        queue.append((x.function.start, y.function.start))

    def by_fuzzy(self) -> None:
        news = sorted(self.free_new(), key=lambda p: p.size)
        sizes = [p.size for p in news]
        scored = []
        for a in self.free_old():
            if a.size < 4:
                continue
            at = bisect.bisect_left(sizes, a.size)
            for b in news[max(0, at - FUZZY_WINDOW) : at + FUZZY_WINDOW]:
                if _sizes_close(a, b):
                    score = fuzzy_score(a, b)
                    if score >= FUZZY_THRESHOLD:
                        scored.append((score, a.function.start, b.function.start))
        scored.sort(reverse=True)
        for _, x, y in scored:
            self.pair(x, y, "fuzzy")

    def _greedy(
        self,
        olds: list[Profile],
        news: list[Profile],
        score: Callable[[Profile, Profile], float],
        how: str,
        floor: float,
        queue: list[tuple[int, int]] | None = None,
    ) -> None:
        scored = sorted(
            ((score(a, b), a.function.start, b.function.start) for a in olds for b in news),
            reverse=True,
        )
        for value, x, y in scored:
            if value >= floor and self.pair(x, y, how) and queue is not None:
                queue.append((x, y))


def _rank(result: DiffResult) -> list[Change]:
    changes = []
    roles = Roles()
    for a, b in result.pairs.items():
        old, new = result.profiles_old[a], result.profiles_new[b]
        if old.exact == new.exact:
            continue
        moved = [result.pairs.get(c, -1) for c in old.callees] != list(new.callees)
        changes.append(change(result.old, result.new, old, new, result.how[a], moved, roles))
    ranked = rank(changes)
    if churned(len(ranked), result.matched):
        return by_outline(ranked, outlines(ranked, result.old, result.new))
    return ranked


def _group(
    profiles: Iterable[Profile], key: Callable[[Profile], object]
) -> dict[object, list[Profile]]:
    groups: dict[object, list[Profile]] = defaultdict(list)
    for p in profiles:
        value = key(p)
        if value is not None:
            groups[value].append(p)
    return groups


def _callers(profiles: Iterable[Profile]) -> dict[int, list[int]]:
    callers: dict[int, list[int]] = defaultdict(list)
    for p in profiles:
        for callee in p.callees:
            callers[callee].append(p.function.start)
    return callers


def _sizes_close(a: Profile, b: Profile) -> bool:
    return abs(a.size - b.size) <= SIZE_SLACK * max(a.size, b.size) + 2
