"""diff's novelty (tools/diff/novelty.py) and the turn-taking of its two orders
(tools/diff/rank.py), on small assembled instruction sequences."""

from __future__ import annotations

import math
from collections import Counter

from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from micropatch.tools.diff.novelty import gain, logic, weigh
from micropatch.tools.diff.rank import Change, check_key, novelty_key, rank
from micropatch.tools.functions import Function
from micropatch.tools.insn import Roles

ADDRESS = 0x1000
CHECK = "mov eax, [rdi + 8]; cmp eax, 6; jl 0x1100; add eax, 1; ret"


def _logic(text: str, roles: Roles | None = None) -> Counter[tuple[int, int]]:
    """The comparisons and calls of `text`; every call gets one token (an import's)."""
    encoding, _ = Ks(KS_ARCH_X86, KS_MODE_64).asm(text, ADDRESS)
    found = (roles or Roles()).of(bytes(encoding or []), ADDRESS)
    return logic(found, [7] * len(found))


def test_registers_do_not_count_but_the_bound_does() -> None:
    roles = Roles()
    old = _logic(CHECK, roles)
    assert gain(old, _logic(CHECK.replace("eax", "ebx").replace("rdi", "r12"), roles)) == ()
    bound = _logic(CHECK.replace("cmp eax, 6", "cmp eax, 8"), roles)
    assert len(gain(old, bound)) == 1  # a bound changed: cmp r32, 8 is new
    wider = _logic(CHECK.replace("cmp eax, 6", "cmp rax, 6"), roles)
    assert len(gain(old, wider)) == 1  # a 64-bit comparison is not a 32-bit one


def test_moving_a_check_gains_nothing_adding_one_and_a_call_gains_each() -> None:
    roles = Roles()
    old = _logic("test esi, esi; je 0x1100; " + CHECK, roles)
    moved = _logic(CHECK.replace("ret", "test esi, esi; je 0x1100; ret"), roles)
    assert gain(old, moved) == ()
    fixed = _logic(
        "test esi, esi; je 0x1100; cmp esi, 0x40; jg 0x1100; call 0x2000; " + CHECK, roles
    )
    assert len(gain(old, fixed)) == 2  # cmp r32, 0x40 and the call
    assert gain(fixed, old) == ()  # what is removed is not gained


def test_a_gain_weighs_by_how_rare_it_is_among_the_changes() -> None:
    common, rare = (2, 11), (2, 12)  # (role, form): comparisons of two forms
    weights = weigh([(common,), (common, rare), (common,), ()])
    assert weights[0] == weights[2] == math.log(5 / 3)
    assert weights[1] == math.log(5 / 3) + math.log(5 / 1)
    assert weights[3] == 0.0
    assert weigh([]) == []


def _change(
    start: int, conditions: int, added: int, removed: int, gained: tuple[tuple[int, int], ...]
) -> Change:
    old = Function(start, start + 0x100, None, (), "symbol")
    return Change(old, old, "name", 0.9, added, removed, "logic", conditions, gained)


def test_rank_takes_turns_between_an_added_check_and_new_logic() -> None:
    check = _change(0x1000, 1, 3, 0, ())  # a check added, nothing rare
    small = _change(0x2000, 1, 5, 1, ())
    rewrite = _change(0x3000, -4, 200, 260, ((2, 1), (2, 2), (3, 3)))  # new bounds, a new call
    feature = _change(0x4000, 0, 40, 10, ((2, 1), (2, 4)))
    churn = [_change(0x5000 + n * 0x100, 0, 9, 9, ((2, 1),)) for n in range(4)]
    changes = [*churn, feature, rewrite, small, check]
    ranked = rank(changes)
    assert [c.old.start for c in ranked[:4]] == [0x1000, 0x3000, 0x2000, 0x4000]
    assert sorted(c.old.start for c in ranked) == sorted(c.old.start for c in changes)
    by_start = {c.old.start: c for c in ranked}
    assert by_start[0x3000].novelty > by_start[0x4000].novelty > 0.0 == by_start[0x1000].novelty
    # Each order alone, for the record: the rewrite is last of the one and first of the other.
    assert max(ranked, key=check_key) is by_start[0x3000]
    assert min(ranked, key=novelty_key) is by_start[0x3000]
