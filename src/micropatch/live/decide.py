"""What one transaction will write, decided from one reading of the registries.

Deciding touches no process: it takes the caves as they were read and returns
a `Commit`, the writes in their crash-safe order (`live.commit` makes them),
with the trampolines laid out and assembled and every registry image encoded.
The engine decides before the stop when a killed patcher left nothing to
recover, and checks inside the stop that the registries are still the ones it
read (`live.prepare`); otherwise, or if they changed, it decides inside the
stop. Either way the decision rests on a reading proved current inside the stop.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from micropatch.arch import TrampolineLayout
from micropatch.errors import AlreadyApplied, CaveError, Downgrade, MicropatchError, NotApplied
from micropatch.live.cave import (
    COUNTER_SIZE,
    Cave,
    allocate,
    allocate_counter,
)
from micropatch.live.mapped import LoadedModule, ModuleCache
from micropatch.live.registry import APPLIED, APPLYING, REMOVING, AppliedPatch, AppliedSite
from micropatch.live.safety import Entering
from micropatch.process.world import STOP_TIMEOUT

if TYPE_CHECKING:  # the planner, the assembler and the patch models load only where used
    from micropatch.live.placed import Placed
    from micropatch.patch.view import PatchView
    from micropatch.trust.admission import Admitted

TRAMPOLINE_SLACK = 32  # body encodings may differ by a few bytes between two addresses


@dataclass(frozen=True)
class Change:
    """What an operation asks of one process: add a patch, remove one, or both (update)."""

    pid: int
    add: Admitted | None
    remove: str | None
    modules: ModuleCache | None = None
    stop_timeout: float = STOP_TIMEOUT

    @property
    def patch_id(self) -> str:
        return self.add.id if self.add is not None else str(self.remove)

    @property
    def action(self) -> str:
        if self.remove is None:
            return "applied"
        return "removed" if self.add is None else "updated"


@dataclass(frozen=True)
class SiteCheck:
    """Bytes a site must hold before the transaction writes anything."""

    address: int
    expected: bytes
    where: str


@dataclass
class Commit:
    """The writes of one transaction, in the order `live.commit.execute` makes them."""

    caves: list[Cave]  # every cave read, as the transaction leaves them
    checks: list[SiteCheck]
    trampolines: list[tuple[int, bytes]]  # code, and counters zeroed, into free slots
    intent: list[tuple[int, bytes]]  # registry images: the patch applying / removing
    result: list[tuple[int, bytes]]  # registry images: applied / forgotten
    new: AppliedPatch | None = None
    old: AppliedPatch | None = None
    layouts: list[TrampolineLayout] = field(default_factory=list)
    entering: list[Entering] = field(default_factory=list)

    @property
    def sites(self) -> int:
        patch = self.new or self.old
        return len(patch.sites) if patch else 0


def find_applied(
    caves: list[Cave], patch_id: str | None
) -> tuple[Cave | None, AppliedPatch | None]:
    for cave in caves:
        found = cave.registry.find(patch_id) if patch_id else None
        if found is not None:
            return cave, found
    return None, None


def refuse(change: Change, process: str, caves: list[Cave], old: AppliedPatch | None) -> None:
    """Refuse what makes no sense given the registries (`process`: its name, for messages)."""
    pid = change.pid
    if change.remove and old is None:
        applied = ", ".join(f"{p.id} v{p.version}" for c in caves for p in c.registry.patches)
        raise NotApplied(
            f"patch {change.remove} is not applied to process {pid} "
            f"({process}); applied there: {applied or 'none'}"
        )
    if change.add is not None and change.remove is None:
        _, existing = find_applied(caves, change.add.id)
        if existing is not None:
            raise AlreadyApplied(
                f"patch {change.add.id} version {existing.version} is already applied to process "
                f"{pid}; use `micropatch update` to replace it"
            )
    if change.add is not None and old is not None and old.version == change.add.version:
        raise AlreadyApplied(
            f"patch {change.add.id} version {old.version} is already applied to process "
            f"{pid}; nothing to update"
        )
    if change.add is not None and old is not None and old.version > change.add.version:
        raise Downgrade(
            f"patch {change.add.id} version {old.version} is applied to process {pid}, "
            f"newer than version {change.add.version}: update refuses a downgrade; to go "
            f"back, `micropatch remove {change.add.id}` then apply the older version"
        )


def expected_sites(planned: list[Placed], replacing: AppliedPatch | None) -> list[SiteCheck]:
    """What every site must hold: the module file's bytes, or, where the patch being
    replaced has a site, its jump. `expect` may reach past the site (up to `resume`):
    all of it must match."""
    checks = []
    for p in planned:
        expected = bytearray(p.expect)
        for old in replacing.sites if replacing else []:
            for i, byte in enumerate(old.jump):
                if 0 <= old.address + i - p.site.address < len(expected):
                    expected[old.address + i - p.site.address] = byte
        checks.append(SiteCheck(p.site.address, bytes(expected), p.where))
    return checks


def decide(
    change: Change,
    caves: list[Cave],
    process: str,
    module: LoadedModule | None = None,
    planned: list[Placed] | None = None,
) -> Commit:
    """The commit of `change` against `caves`, which it updates to the state it leaves.
    Adding needs the module's cave among `caves` (the engine makes it first)."""
    old_cave, old = find_applied(caves, change.remove) if change.remove else (None, None)
    refuse(change, process, caves, old)
    if change.add is None:
        assert old is not None and old_cave is not None
        old.state = REMOVING
        intent = record(old_cave)
        old_cave.registry.retire(old)
        return Commit(caves, [], [], intent, record(old_cave), old=old)
    assert module is not None and planned is not None
    cave = next(c for c in caves if c.registry.module_base == module.base)
    checks = expected_sites(planned, old)
    new, layouts, trampolines = _trampolines(cave, change.add.patch, planned)
    cave.registry.patches.append(new)
    intent = []
    if old is not None and old_cave is not None:
        old.state = REMOVING
        if old_cave is not cave:
            intent += record(old_cave)
    intent += record(cave)
    result = []
    if old is not None and old_cave is not None:
        old_cave.registry.retire(old)
        if old_cave is not cave:
            result += record(old_cave)
    new.state = APPLIED
    result += record(cave)
    entering = [Entering(p.site, p.resume is None, p.where) for p in planned]
    return Commit(caves, checks, trampolines, intent, result, new, old, layouts, entering)


def record(cave: Cave) -> list[tuple[int, bytes]]:
    """The next state of the cave's registry, as the writes that record it: the slot not
    holding the current state (and its overflow area, first, if the JSON needs it)."""
    cave.registry.seq += 1
    return [(cave.address + offset, data) for offset, data in cave.registry.images()]


def _trampolines(
    cave: Cave, patch: PatchView, planned: list[Placed]
) -> tuple[AppliedPatch, list[TrampolineLayout], list[tuple[int, bytes]]]:
    sites, layouts, writes = [], [], []
    for p, layout, counter in layout_all(cave, planned):
        writes.append((layout.address, layout.code))
        if counter:  # a slot may have counted for an old patch
            writes.append((counter, bytes(COUNTER_SIZE)))
        layouts.append(layout)
        sites.append(
            AppliedSite(
                p.index,
                p.site.address,
                p.site.original,
                p.arch.site_jump(p.site, layout.address),
                layout.address,
                layout.size,
                layout.tail,
                counter,
                list(layout.copies),
                list(layout.body),
                list(p.site.starts),
                f"{zlib.crc32(layout.code):08x}",
            )
        )
    title = patch.info.title or ""
    new = AppliedPatch(patch.id, patch.version, title, time.time(), sites, APPLYING)
    return new, layouts, writes


def layout_all(cave: Cave, planned: list[Placed]) -> list[tuple[Placed, TrampolineLayout, int]]:
    """Where each trampoline (and blocked-event counter, 0 if none) goes in the cave,
    and the trampoline laid out for that place."""
    taken = cave.registry.used_ranges()
    counters = cave.registry.used_counters()
    code_end = cave.registry.layout.code_end(cave.size)
    start = cave.registry.layout.code_start
    placed = []
    for p in planned:
        counter = allocate_counter(counters, cave) if p.needs_counter else 0
        counters.append(counter)
        layout = _first_free(p, taken, cave, code_end, start, counter)
        if layout is None:
            estimate = p.trampoline(cave.address + code_end // 2, counter).size + TRAMPOLINE_SLACK
            slot = allocate(taken, cave.address, code_end, estimate, start=start)
            layout = p.trampoline(slot, counter)
            if layout.size > estimate:
                raise MicropatchError(
                    f"{p.where}: trampoline grew from {estimate} to {layout.size} bytes"
                )
        taken.append((layout.address, layout.end))
        placed.append((p, layout, counter))
    return placed


def _first_free(
    p: Placed,
    taken: list[tuple[int, int]],
    cave: Cave,
    code_end: int,
    start: int,
    counter: int,
) -> TrampolineLayout | None:
    """The trampoline laid out at the cave's first free place, if it fits there: where a
    new or compact cave puts it, assembled once. None: it does not fit there (or the cave
    is full), and the caller estimates its size elsewhere first and allocates for that."""
    try:
        first = allocate(taken, cave.address, code_end, 1, start=start)
    except CaveError:
        return None
    layout = p.trampoline(first, counter)
    try:
        fits = allocate(taken, cave.address, code_end, layout.size, start=start) == first
    except CaveError:
        return None
    return layout if fits else None
