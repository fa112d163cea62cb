"""live.decide.layout_all: each trampoline laid out (its body assembled) once, at the
cave's first free place, when it fits there; elsewhere only after an estimate."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from micropatch.arch import TrampolineLayout
from micropatch.errors import MicropatchError
from micropatch.live.cave import ALIGN, CAVE_SIZE, Cave
from micropatch.live.decide import TRAMPOLINE_SLACK, layout_all
from micropatch.live.registry import LAYOUT, Registry, Retired

BASE = 0x7F00_0000_0000
FIRST = BASE + LAYOUT.code_start


@dataclass
class Planned:
    """A planned site whose trampoline is `size` bytes (then, from the n-th layout on,
    `later[n]`); records where each layout was made."""

    size: int
    later: dict[int, int] = field(default_factory=dict)
    needs_counter: bool = False
    where: str = "patchlet[0] (f) in m"
    laid: list[int] = field(default_factory=list)

    def trampoline(self, address: int, counter: int) -> TrampolineLayout:
        size = self.later.get(len(self.laid), self.size)
        self.laid.append(address)
        return TrampolineLayout(address, b"\xcc" * size, (address, address + 1), (), False)


def cave(retired: list[Retired] | None = None) -> Cave:
    registry = Registry("/m", 0, None, "", CAVE_SIZE)
    registry.retired = retired or []
    return Cave(BASE, CAVE_SIZE, registry)


def lay(target: Cave, *planned: Planned) -> list[tuple[Any, TrampolineLayout, int]]:
    return layout_all(target, cast(Any, list(planned)))


def test_a_new_cave_lays_each_trampoline_out_once_one_after_the_other() -> None:
    a, b = Planned(40), Planned(24)
    placed = lay(cave(), a, b)
    assert a.laid == [FIRST] and b.laid == [FIRST + 48]
    assert [(layout.address, layout.size) for _, layout, _ in placed] == [
        (FIRST, 40),
        (FIRST + 48, 24),
    ]


def test_a_first_gap_too_small_takes_an_estimate_then_the_first_place_that_holds_it() -> None:
    """A retired trampoline 32 bytes in leaves a 32-byte gap at the start: a 40-byte
    trampoline laid out there does not fit, so its size is estimated mid-cave and it
    goes after the retired one, with the slack the estimate allows for."""
    a = Planned(40)
    [(_, layout, _)] = lay(cave([Retired(FIRST + 32, 16)]), a)
    middle = BASE + LAYOUT.code_end(CAVE_SIZE) // 2
    assert a.laid == [FIRST, middle, FIRST + 48]
    assert layout.address == FIRST + 48 and layout.size == 40
    assert (FIRST + 48) % ALIGN == 0


def test_a_trampoline_that_grows_beyond_its_estimate_is_refused() -> None:
    """Laid out where it goes, it is TRAMPOLINE_SLACK + 1 bytes larger than where its
    size was estimated: refused, as before."""
    grows = Planned(40, later={2: 40 + TRAMPOLINE_SLACK + 1})
    with pytest.raises(MicropatchError, match="trampoline grew from 72 to 73 bytes"):
        lay(cave([Retired(FIRST + 32, 16)]), grows)
    assert len(grows.laid) == 3
