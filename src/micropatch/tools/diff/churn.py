"""Ranking when most functions changed: by what a compiler change keeps.

Two builds by another compiler (or with other flags) differ in nearly every
function: registers, scheduling, instruction selection, inlining of `memcpy`
and `memset`, block layout. The two orders of `diff.rank` then see logic
changed everywhere. What a compiler change keeps is the program's own outline:
the constants it computes with, the bounds it compares against, the functions
it calls, and how many of its conditional branches lead straight to a return
(an early return, an error path). So when most matched functions changed
(`churned`), the changes are ordered by how their outline changed:

1. those that gained a conditional branch to a return first: a fix adds a
   check that bails out;
2. then by the outline they gained: each constant, compared constant and callee
   the new code has and the old did not, weighed by how rare that gain is among
   all the changes (`log((N + 1) / n)`, as in `diff.novelty`);
3. ties in the order `diff.rank` gave.

Left out, as a compiler's choice rather than the program's: immediates below
256 unless compared (sizes, shifts, strides of unrolled loops), the frame size,
multipliers (a division by a constant), and calls to the memory and string
functions a compiler expands inline or calls at will.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from micropatch.tools.insn import (
    ends_flow,
    is_call,
    is_conditional,
    is_return,
    kept_constants,
    near_branch_target,
    restores_frame,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from micropatch.tools.analysis import ModuleAnalysis
    from micropatch.tools.diff.rank import Change
    from micropatch.tools.insn import Instruction

SMALL = 256  # immediates below this are a compiler's as often as the program's, unless compared
BUILTINS = frozenset({"memcpy", "memset", "memmove", "memcmp", "strlen", "strcmp", "bzero"})
# Instructions from a branch's target to its return, the frame's restoring aside:
# an error path sets an error code and a return value, maybe through a jump.
EXIT_REACH = 4

Feature = tuple[str, int | str]


@dataclass(frozen=True)
class Outline:
    """What a compiler change keeps of one function, its outline (the module docstring)."""

    features: frozenset[Feature]
    exits: int  # conditional branches that lead straight to a return


Pair = tuple[Outline, Outline]


def churned(changed: int, matched: int) -> bool:
    """Most matched functions changed: the builds differ throughout."""
    return 2 * changed > matched


def outline(instructions: Sequence[Instruction], label: Callable[[int], str | None]) -> Outline:
    """The outline of a function's `instructions`; `label` names a call's target."""
    constants, compared = kept_constants(instructions)
    features: set[Feature] = {("constant", c) for c in constants if abs(c) >= SMALL}
    features |= {("compared", c) for c in compared}
    at = {instruction.ip: n for n, instruction in enumerate(instructions)}
    exits = 0
    for instruction in instructions:
        target = near_branch_target(instruction)
        if target is None:
            continue
        if is_call(instruction):
            name = (label(target) or "").split("@", 1)[0]
            if name and name not in BUILTINS:
                features.add(("call", name))
        elif is_conditional(instruction) and _returns(instructions, at, at.get(target)):
            exits += 1
    return Outline(frozenset(features), exits)


def outlines(changes: list[Change], old: ModuleAnalysis, new: ModuleAnalysis) -> list[Pair]:
    """The (old, new) outline of each change."""
    return [
        (outline(old.decode(c.old), old.label), outline(new.decode(c.new), new.label))
        for c in changes
    ]


def by_outline(changes: list[Change], pairs: Sequence[Pair]) -> list[Change]:
    """`changes` (in `diff.rank`'s order), with their (old, new) outlines, in the
    order of the module docstring."""
    gains = [
        (after.exits > before.exits, after.features - before.features) for before, after in pairs
    ]
    spread = Counter(feature for _, gained in gains for feature in gained)
    total = len(changes) + 1
    weights = [sum(math.log(total / spread[f]) for f in gained) for _, gained in gains]
    order = sorted(range(len(changes)), key=lambda n: (not gains[n][0], -round(weights[n], 6), n))
    return [changes[n] for n in order]


def _returns(instructions: Sequence[Instruction], at: dict[int, int], start: int | None) -> bool:
    """True if the code from `start` reaches a return within `EXIT_REACH`
    instructions, the frame's restoring aside, with no conditional branch on the
    way (following jumps)."""
    position, steps = start, 0
    for _ in range(len(instructions)):
        if position is None or position >= len(instructions) or steps > EXIT_REACH:
            return False
        instruction = instructions[position]
        if is_return(instruction):
            return True
        if is_conditional(instruction):
            return False
        steps += not restores_frame(instruction)
        if ends_flow(instruction):
            target = near_branch_target(instruction)
            position = at.get(target) if target is not None else None
        else:
            position += 1
    return False
