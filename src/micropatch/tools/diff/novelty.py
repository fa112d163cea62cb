"""How much new logic a change brings that the rest of the module's changes do not.

A security fix adds a comparison against a bound the old code did not check,
or a call it did not make (an error path, a free). A rebuild with another
compiler, or a change of inlining, also brings comparisons and calls, but the
same kinds of them in many functions at once. So each comparison or call the
new code has more of than the old (a multiset difference, blind to order:
moving a check is not adding one) weighs by how rare that gain is across all
the changes of the diff, as in tf-idf: `log((N + 1) / n)` where `N` is the
number of changed functions and `n` the number of those that gained the same
thing. A gain found in one function weighs most; one found in every changed
function weighs least.

What is compared: a comparison (`cmp`, `test`) by its registers-free form (its
operands' sizes, memory shape, small constants: `cmp r32, 6` is not
`cmp r32, 8`); a call by its token (it names an imported callee). Conditional
jumps are left out: a compiler inverts them when it lays out blocks otherwise,
so their mnemonics change with no change of logic.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

from micropatch.tools.insn import ROLE_CALL, ROLE_COMPARISON

# (role, mnemonic, registers-free form) per instruction, from `insn.Roles.of`.
Triples = Sequence[tuple[int, int, int]]
Gain = tuple[tuple[int, int], ...]


def logic(roles: Triples, tokens: Sequence[int]) -> Counter[tuple[int, int]]:
    """The comparisons (by form) and calls (by token) of one function, as a multiset."""
    found: Counter[tuple[int, int]] = Counter()
    for (role, _, form), token in zip(roles, tokens, strict=True):
        if role == ROLE_COMPARISON:
            found[role, form] += 1
        elif role == ROLE_CALL:
            found[role, token] += 1
    return found


def gain(old: Counter[tuple[int, int]], new: Counter[tuple[int, int]]) -> Gain:
    """What `new` has more of than `old`, one element per instance, in a stable order."""
    return tuple(sorted((new - old).elements()))


def weigh(gains: Sequence[Gain]) -> list[float]:
    """The novelty of each change: its gains, each weighted by how rare it is
    among all the `gains` of the diff (the module docstring)."""
    spread: Counter[tuple[int, int]] = Counter()
    for found in gains:
        spread.update(set(found))
    total = len(gains) + 1
    return [sum(math.log(total / spread[item]) for item in found) for found in gains]
