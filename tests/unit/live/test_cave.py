"""Cave slot allocation and placement: pure functions of addresses and mappings."""

from types import SimpleNamespace

import pytest

from micropatch.arch.x86_64.constants import PAGE_SIZE
from micropatch.errors import CaveError
from micropatch.live.cave import (
    ALIGN,
    CAVE_SIZE,
    COUNTER_SIZE,
    REACH,
    Cave,
    allocate,
    allocate_counter,
    candidate_addresses,
)
from micropatch.live.registry import (
    LAYOUT,
    LAYOUT_V2,
    LAYOUT_V3,
    REGISTRY_SIZE,
    AppliedPatch,
    AppliedSite,
    Registry,
    Retired,
)
from micropatch.process.maps import Mapping

BASE = 0x7F00_0000_0000
FIRST = BASE + REGISTRY_SIZE
CODE = CAVE_SIZE  # the code runs to the cave's end
COUNTERS = BASE + PAGE_SIZE - 1024  # in the registry's page, after both slots


def test_allocate_after_the_registry_and_aligned() -> None:
    assert allocate([], BASE, CODE, 1) == FIRST
    assert allocate([(FIRST, FIRST + 1)], BASE, CODE, 8) == FIRST + ALIGN
    assert allocate([(FIRST, FIRST + 17)], BASE, CODE, 8) == FIRST + 2 * ALIGN


def test_allocate_takes_the_first_hole_big_enough_whatever_the_order() -> None:
    taken = [(FIRST + 200, FIRST + 300), (FIRST, FIRST + 32), (FIRST + 64, FIRST + 100)]
    assert allocate(taken, BASE, CODE, 32) == FIRST + 32  # exactly fits
    assert allocate(taken, BASE, CODE, 80) == FIRST + 112  # 100 aligned up; 112+80 <= 200
    assert allocate(taken, BASE, CODE, 100) == FIRST + 304


def test_allocate_overlapping_ranges_never_reuse_taken_bytes() -> None:
    taken = [(FIRST, FIRST + 100), (FIRST + 16, FIRST + 40)]  # the second inside the first
    assert allocate(taken, BASE, CODE, 16) == FIRST + 112


def test_allocate_exact_fit_at_the_end_then_full() -> None:
    room = CODE - REGISTRY_SIZE
    assert allocate([], BASE, CODE, room) == FIRST
    with pytest.raises(CaveError, match=rf"cave at {BASE:#x} is full \({room} bytes"):
        allocate([], BASE, CODE, room + 1)
    with pytest.raises(CaveError, match="remove unused patches"):
        allocate([(FIRST, FIRST + 16)], BASE, CODE, room - 15)


def test_counters_share_the_registry_page_after_its_slots() -> None:
    cave = Cave(BASE, CAVE_SIZE, Registry("/m", 0, None, "", CAVE_SIZE))
    assert BASE + LAYOUT.slots[1] + LAYOUT.slot_size == COUNTERS  # no slot reaches them
    assert allocate_counter([], cave) == COUNTERS
    assert allocate_counter([COUNTERS, COUNTERS + 16], cave) == COUNTERS + COUNTER_SIZE
    every = list(range(COUNTERS, BASE + PAGE_SIZE, COUNTER_SIZE))
    assert len(every) == 128
    assert allocate_counter(every[1:], cave) == COUNTERS
    with pytest.raises(CaveError, match="no free blocked-event counter"):
        allocate_counter(every, cave)


@pytest.mark.parametrize("layout", [LAYOUT_V3, LAYOUT_V2])
def test_a_cave_of_an_earlier_layout_keeps_its_counters_in_its_last_page(layout) -> None:  # type: ignore[no-untyped-def]
    """A process patched before an upgrade: its cave's counters stay where they are,
    and the code ends before them."""
    cave = Cave(BASE, CAVE_SIZE, Registry("/m", 0, None, "", CAVE_SIZE, layout=layout))
    last = BASE + CAVE_SIZE - PAGE_SIZE
    assert allocate_counter([], cave) == last
    assert allocate_counter([last], cave) == last + COUNTER_SIZE
    assert layout.code_end(CAVE_SIZE) == CAVE_SIZE - PAGE_SIZE
    assert layout.writable_area(CAVE_SIZE) == (CAVE_SIZE - PAGE_SIZE, CAVE_SIZE)


def test_the_registry_pages_are_the_writable_ones_and_the_code_the_rest() -> None:
    assert LAYOUT.writable_area(CAVE_SIZE) == (0, LAYOUT.code_start)
    assert LAYOUT.code_end(CAVE_SIZE) == CAVE_SIZE


def site(trampoline: int, size: int, counter: int = 0) -> AppliedSite:
    return AppliedSite(0, 0x1000, b"\x90" * 5, b"\xe9" + bytes(4), trampoline, size, 0, counter)


def test_registry_used_ranges_and_counters_span_every_patch() -> None:
    registry = Registry("/m", 0, None, "", CAVE_SIZE)
    registry.patches = [
        AppliedPatch("b", 1, "", 0.0, [site(FIRST + 64, 10, FIRST + 5), site(FIRST, 20)]),
        AppliedPatch("a", 1, "", 0.0, [site(FIRST + 32, 8, FIRST + 7)]),
    ]
    assert registry.used_ranges() == [
        (FIRST, FIRST + 20),
        (FIRST + 32, FIRST + 40),
        (FIRST + 64, FIRST + 74),
    ]
    assert registry.used_counters() == [FIRST + 5, FIRST + 7]
    assert allocate(registry.used_ranges(), BASE, CODE, 12) == FIRST + 48


def test_retired_trampolines_and_counters_are_never_reused() -> None:
    """A thread may still run in a removed patch's trampoline, or increment its counter:
    until reclaimed, a retired slot is as taken as a live one."""
    page = COUNTERS
    cave = Cave(BASE, CAVE_SIZE, Registry("/m", 0, None, "", CAVE_SIZE))
    registry = cave.registry
    registry.patches = [AppliedPatch("a", 1, "", 0.0, [site(FIRST + 64, 16, page + 8)])]
    registry.retired = [Retired(FIRST, 40, page), Retired(FIRST + 48, 8)]
    assert registry.used_ranges() == [
        (FIRST, FIRST + 40),
        (FIRST + 48, FIRST + 56),
        (FIRST + 64, FIRST + 80),
    ]
    assert registry.used_counters() == [page + 8, page]
    assert allocate(registry.used_ranges(), BASE, CODE, 8) == FIRST + 80
    assert allocate_counter(registry.used_counters(), cave) == page + 2 * COUNTER_SIZE
    registry.retired = []  # reclaimed: the slots are free again
    assert allocate(registry.used_ranges(), BASE, CODE, 40) == FIRST
    assert allocate_counter(registry.used_counters(), cave) == page


def mapping(start: int, end: int) -> Mapping:
    return Mapping(start, end, "r--p", 0, "00:00", 0, "")


MODULE_LOW, MODULE_HIGH = 0x5555_0000_0000, 0x5555_0001_0000
MODULE = SimpleNamespace(low=MODULE_LOW, high=MODULE_HIGH, path="/m", pid=1)


def check_candidate(address: int, mappings: list[Mapping]) -> None:
    assert address % PAGE_SIZE == 0
    # every module byte within a rel32 jump of every cave byte
    assert address + CAVE_SIZE - MODULE_LOW <= REACH and MODULE_HIGH - address <= REACH
    assert all(address + CAVE_SIZE <= m.start or m.end <= address for m in mappings)


def test_candidates_below_the_module_first_nearest_first() -> None:
    mappings = [
        mapping(MODULE_LOW - 0x100000, MODULE_LOW - 0x50000),  # leaves a gap just below
        mapping(MODULE_LOW, MODULE_HIGH),
        mapping(MODULE_HIGH + 0x100000, MODULE_HIGH + 0x200000),
    ]
    found = candidate_addresses(mappings, MODULE, CAVE_SIZE)  # type: ignore[arg-type]
    assert found[0] == MODULE_LOW - CAVE_SIZE  # right under the module
    assert found[1] < MODULE_LOW - 0x100000  # under the next mapping down
    above = [a for a in found if a > MODULE_LOW]
    # above: a little above the module, leaving room for brk()
    assert above[0] == MODULE_HIGH + 16 * PAGE_SIZE
    assert found.index(above[0]) > max(found.index(a) for a in found if a < MODULE_LOW)
    for address in found:
        check_candidate(address, mappings)


def test_no_candidate_when_everything_in_reach_is_taken() -> None:
    mappings = [mapping(MODULE_HIGH - REACH, MODULE_LOW + REACH)]
    assert candidate_addresses(mappings, MODULE, CAVE_SIZE) == []  # type: ignore[arg-type]


def test_low_module_gets_candidates_above_the_minimum_address() -> None:
    low = SimpleNamespace(low=0x400000, high=0x410000, path="/m", pid=1)
    mappings = [mapping(0x400000, 0x410000)]
    found = candidate_addresses(mappings, low, CAVE_SIZE)  # type: ignore[arg-type]
    assert found and all(a >= 0x10000 for a in found)
    assert found[0] == 0x400000 - CAVE_SIZE
