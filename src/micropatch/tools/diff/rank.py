"""Ranking the changed functions of a diff: the fix first.

A fix adds a check to code that stays, or rewrites the code it fixes with
comparisons and calls it did not have. So the changes are put in two orders
and taken from them in turn, each once: the first of the check order, the
first of the novelty order, the second of the check order, and so on
(docs/finding-the-site.md, "How diff ranks").

The check order (`check_key`):

1. Changes of operands only last: the same instructions in the same order,
   only their constants, strings or registers differ (a line number in an
   assertion, a version string, register allocation).
2. How surely the pair is matched: by name, identical code or the same strings
   and imports first; by the call graph next; by fuzzy likeness last (a fuzzy
   pair that differs is as likely a wrong match as a change).
3. What the edit touches. **logic**: the function's conditions (conditional
   jumps, moves and sets), comparisons (`cmp`, `test`) and calls, in order,
   are not the same: one was added or removed, a condition changed (`jl` to
   `jle`), a bound changed (a comparison's constant), or a call goes to
   another function. Registers do not count: a register allocated
   differently is not a change of logic. **code**: other instructions come
   or go (a move, some arithmetic).
4. Among changes of logic, those that add conditions (more conditional jumps,
   moves and sets after the change than before) first: a security fix adds a
   check.
5. The smallest change of size (instructions added minus removed, either
   way): a check added to existing code leaves the function about as long as
   it was, where new features grow it and rewrites shrink it.
6. The smallest edit (instructions added plus removed), then the most similar.

The novelty order (`novelty_key`): operands-only changes and fuzzy matches
last, then the most novel: the comparisons and calls the new code gained, each
weighted by how rare that gain is among all the changes of the diff
(`diff.novelty`): a bound checked in one function is news, a kind of
comparison a new compiler brings to every function is not.

The edit is the longest common subsequence of the two functions' normalised
instructions (rapidfuzz's bit-parallel LCS).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from rapidfuzz.distance import LCSseq

from micropatch.tools.diff.novelty import Gain, gain, logic, weigh
from micropatch.tools.functions import Function
from micropatch.tools.insn import ROLE_CALL, ROLE_CONDITION, ROLE_OTHER, Roles

if TYPE_CHECKING:
    from micropatch.tools.analysis import ModuleAnalysis
    from micropatch.tools.diff.features import Profile

# Methods by confidence: a fuzzy match that differs is as likely a wrong match as a change.
CONFIDENCE = {"name": 0, "exact": 0, "anchors": 0, "callgraph": 1, "fuzzy": 2}
Kind = Literal["logic", "code", "operands"]
KIND_ORDER: dict[str, int] = {"logic": 0, "code": 1, "operands": 2}


@dataclass(frozen=True)
class Change:
    """A matched function whose code changed; `added`/`removed` count instructions.

    `kind` is what the edit touches (logic, code, operands: see the module
    docstring); `conditions` is how many more conditions the new code has;
    `gained` the comparisons and calls it has more of, and `novelty` their
    weight against the whole diff's (`rank` sets it).
    """

    old: Function
    new: Function
    method: str
    similarity: float
    added: int
    removed: int
    kind: Kind
    conditions: int
    gained: Gain = ()
    novelty: float = 0.0

    @property
    def name(self) -> str | None:
        return self.old.name or self.new.name

    def as_json(self) -> dict[str, object]:
        return {
            "old_offset": self.old.start,
            "new_offset": self.new.start,
            "name": self.name,
            "similarity": round(self.similarity, 4),
            "old_end": self.old.end,
            "new_end": self.new.end,
            "method": self.method,
            "added": self.added,
            "removed": self.removed,
            "kind": self.kind,
            "conditions": self.conditions,
            "novelty": round(self.novelty, 3),
        }


def change(
    old_index: ModuleAnalysis,
    new_index: ModuleAnalysis,
    old: Profile,
    new: Profile,
    method: str,
    callees_moved: bool,
    roles: Roles,
) -> Change:
    """The change between two matched functions whose tokens differ.

    `callees_moved`: the old function's callees, mapped through the match, are not
    the new function's (a call to another local function is not in the tokens).
    `roles`: a cache shared by the changes of one diff."""
    old_roles = roles.of(old_index.code(old.function), old.function.start)
    new_roles = roles.of(new_index.code(new.function), new.function.start)
    common = LCSseq.similarity(old.tokens, new.tokens)
    removed, added = old.size - common, new.size - common
    kind: Kind = "logic"
    if not callees_moved and not _touches_logic(old_roles, new_roles, old.tokens, new.tokens):
        same_instructions = [r[1] for r in old_roles] == [r[1] for r in new_roles]
        kind = "operands" if same_instructions else "code"
    conditions = _count(new_roles) - _count(old_roles)
    total = old.size + new.size
    similarity = 2 * common / total if total else 1.0
    gained = gain(logic(old_roles, old.tokens), logic(new_roles, new.tokens))
    return Change(
        old.function, new.function, method, similarity, added, removed, kind, conditions, gained
    )


def rank(changes: list[Change]) -> list[Change]:
    """The changes with their novelty (against each other), in turn from the
    two orders of the module docstring: `check_key`'s first, `novelty_key`'s
    first, `check_key`'s second, and so on, each change once."""
    weighed = [
        replace(c, novelty=n)
        for c, n in zip(changes, weigh([c.gained for c in changes]), strict=True)
    ]
    orders = [sorted(weighed, key=check_key), sorted(weighed, key=novelty_key)]
    ranked: list[Change] = []
    taken: set[int] = set()
    positions = [0, 0]
    while len(ranked) < len(weighed):
        for which, order in enumerate(orders):
            while positions[which] < len(order) and id(order[positions[which]]) in taken:
                positions[which] += 1
            if positions[which] < len(order):
                taken.add(id(order[positions[which]]))
                ranked.append(order[positions[which]])
    return ranked


CheckKey = tuple[bool, int, int, bool, int, int, float]


def check_key(change: Change) -> CheckKey:
    """The order of a check added to code: operands-only last, the surest match,
    logic first, conditions added, the smallest change of size, the smallest edit."""
    return (
        change.kind == "operands",
        CONFIDENCE[change.method],
        KIND_ORDER[change.kind],
        not (change.kind == "logic" and change.conditions > 0),
        abs(change.added - change.removed),
        change.added + change.removed,
        -change.similarity,
    )


def novelty_key(change: Change) -> tuple[bool, bool, float, CheckKey]:
    """The order of new logic: operands-only last, fuzzy matches last, the most
    novel first (ties in `check_key`'s order)."""
    return (
        change.kind == "operands",
        change.method == "fuzzy",
        -round(change.novelty, 6),
        check_key(change),
    )


_Roles = list[tuple[int, int, int]]


def _touches_logic(
    old: _Roles, new: _Roles, old_tokens: tuple[int, ...], new_tokens: tuple[int, ...]
) -> bool:
    """True if the edit between the registers-free forms inserts or deletes a
    condition, comparison or call (a call by its token, which names an imported
    callee). A check moved elsewhere is deleted at one place, inserted at another."""
    old_keys = [t if r[0] == ROLE_CALL else r[2] for r, t in zip(old, old_tokens, strict=True)]
    new_keys = [t if r[0] == ROLE_CALL else r[2] for r, t in zip(new, new_tokens, strict=True)]
    for op in LCSseq.editops(old_keys, new_keys):  # insertions and deletions only
        role = old[op.src_pos][0] if op.tag == "delete" else new[op.dest_pos][0]
        if role != ROLE_OTHER:
            return True
    return False


def _count(found: _Roles) -> int:
    return sum(role == ROLE_CONDITION for role, _, _ in found)
