"""The ordered writes of one transaction, each step one the target survives.

Every step below is taken with all threads stopped, through a journal
(`Transaction`) that undoes it on any error. The order is what makes the
patcher's own death harmless at any instant (see docs/engine.md, "Crash
consistency"):

apply:   trampolines -> registry says `applying` -> threads moved into the copies
         -> jumps, one by one -> registry says `applied`
remove:  registry says `removing` -> original bytes, one by one -> registry forgets
         the patch and retires its trampolines
update:  both at once: the old patch `removing` and the new one `applying` in one
         registry write, old sites restored, new jumps written, one final write.

Nothing the registry does not mention is ever reached by a thread, and every
state the registry records is one `live.recovery` completes or rolls back.
"""

from __future__ import annotations

import logging
import time
import zlib
from typing import TYPE_CHECKING

from micropatch.arch import TrampolineLayout
from micropatch.errors import MicropatchError, OriginalBytesMismatch
from micropatch.faults import checkpoint
from micropatch.live.cave import (
    CAVE_SIZE,
    COUNTER_SIZE,
    COUNTERS_SIZE,
    Cave,
    allocate,
    allocate_counter,
    map_cave,
    unmap_cave,
)
from micropatch.live.module import LoadedModule
from micropatch.live.registry import APPLYING, AppliedPatch, AppliedSite, Registry
from micropatch.live.safety import PendingMove, in_use, into_copy
from micropatch.live.transaction import Transaction

if TYPE_CHECKING:
    from micropatch.build.plan import PlannedSite
    from micropatch.patch.view import PatchView

log = logging.getLogger(__name__)

TRAMPOLINE_SLACK = 32  # body encodings may differ by a few bytes between two addresses


def store(tx: Transaction, cave: Cave) -> None:
    """Write the cave's registry into the slot that does not hold the current one."""
    cave.registry.seq += 1
    tx.write(cave.address + cave.registry.slot, cave.registry.encode())


def check_originals(
    tx: Transaction,
    caves: list[Cave],
    patch: PatchView,
    planned: list[PlannedSite],
    replacing: AppliedPatch | None,
) -> None:
    """Every site holds the module file's bytes (or, where the patch being replaced
    has a site, its jump): nothing else hooks it."""
    for p in planned:
        # `expect` may reach past the site (up to `resume`): all of it must match.
        found = tx.memory.read(p.site.address, len(p.expect))
        expected = bytearray(p.expect)
        for old in replacing.sites if replacing else []:
            for i, byte in enumerate(old.jump):
                if 0 <= old.address + i - p.site.address < len(expected):
                    expected[old.address + i - p.site.address] = byte
        if found != expected:
            raise OriginalBytesMismatch(
                f"patch {patch.id}, {p.where}: site {p.site.address:#x} in process {tx.proc.pid} "
                f"holds {found.hex(' ')}, the patch expects {p.expect.hex(' ')}"
                + _who_hooks(caves, p.site.address, p.site.end)
            )


def new_cave(tx: Transaction, caves: list[Cave], module: LoadedModule) -> Cave:
    """Map a cave near the module; unmapped again on rollback."""
    address = map_cave(tx.syscalls, tx.memory, tx.mappings, module)
    registry = Registry(
        module_path=module.path,
        module_base=module.base,
        build_id=module.identity.build_id,
        sha256=module.identity.sha256,
        cave_size=CAVE_SIZE,
    )
    cave = Cave(address, CAVE_SIZE, registry)
    caves.append(cave)
    tx.on_rollback(lambda: unmap_cave(tx.syscalls, cave))
    return cave


def write_trampolines(
    tx: Transaction, cave: Cave, patch: PatchView, planned: list[PlannedSite]
) -> tuple[AppliedPatch, list[TrampolineLayout]]:
    """Step 1 of apply: trampolines into free slots (nothing refers to them yet)."""
    sites, layouts = [], []
    for p, layout, counter in layout_all(cave, planned):
        tx.write(layout.address, layout.code)
        if counter:
            tx.write(counter, bytes(COUNTER_SIZE))  # a slot may have counted for an old patch
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
    checkpoint("trampolines-written")
    title = patch.info.title or ""
    return AppliedPatch(patch.id, patch.version, title, time.time(), sites, APPLYING), layouts


def move_threads(
    tx: Transaction, pending: list[PendingMove], layouts: list[TrampolineLayout]
) -> None:
    """Threads stopped at a displaced instruction go to its copy, now: the copy is
    written and recorded, so they run correctly whether or not the jump follows."""
    for move in pending:
        regs = tx.proc.regs(move.tid)
        before = regs.rip
        regs.rip = into_copy(move, layouts[move.index], regs)
        log.debug(
            "process %d: thread %d moves from %#x to %#x", tx.proc.pid, move.tid, before, regs.rip
        )
        tx.proc.set_regs(move.tid, regs)

        def undo(tid: int = move.tid, rip: int = before) -> None:
            back = tx.proc.regs(tid)
            back.rip = rip
            tx.proc.set_regs(tid, back)

        tx.on_rollback(undo)
    if pending:
        checkpoint("threads-moved")


def write_jumps(tx: Transaction, patch: AppliedPatch) -> None:
    for index, site in enumerate(patch.sites):
        tx.write(site.address, site.jump)
        checkpoint(f"jump-{index}-written")


def restore_sites(tx: Transaction, patch: AppliedPatch) -> None:
    for index, site in enumerate(patch.sites):
        found = tx.memory.read(site.address, len(site.jump))
        if found != site.jump:
            raise OriginalBytesMismatch(
                f"site {site.address:#x} of patch {patch.id} in process {tx.proc.pid} holds "
                f"{found.hex(' ')} instead of micropatch's jump {site.jump.hex(' ')}: another tool "
                "has rewritten it; not removing"
            )
        tx.write(site.address, site.original)
        checkpoint(f"site-{index}-restored")


def reclaim(tx: Transaction, caves: list[Cave], *, everything: bool = False) -> None:
    """Free retired trampolines no thread can be in any more; unmap caves left empty.

    Proving a trampoline free means scanning every thread's stack, so it is done
    only where it pays: a cave left without patches (to unmap it), one whose
    retired trampolines take more than a quarter of its code area, or
    `everything` (repair). The unmap comes last: the one step the journal cannot undo.
    """
    emptied = []
    for cave in caves:
        retired = cave.registry.retired
        crowded = sum(r.size for r in retired) * 4 > cave.size
        if retired and (everything or crowded or not cave.registry.patches):
            busy = in_use(
                tx.proc, tx.mappings, [(r.trampoline, r.trampoline + r.size) for r in retired]
            )
            kept = [r for i, r in enumerate(retired) if i in busy]
            if len(kept) != len(retired):
                cave.registry.retired = kept
                if cave.registry.patches or kept:
                    store(tx, cave)
        if not cave.registry.patches and not cave.registry.retired:
            emptied.append(cave)
    tx.verify()
    for cave in emptied:
        unmap_cave(tx.syscalls, cave)
        checkpoint("cave-unmapped")


def layout_all(
    cave: Cave, planned: list[PlannedSite]
) -> list[tuple[PlannedSite, TrampolineLayout, int]]:
    """Where each trampoline (and blocked-event counter, 0 if none) goes in the cave,
    and the trampoline laid out for that place."""
    taken = cave.registry.used_ranges()
    counters = cave.registry.used_counters()
    code_size = cave.size - COUNTERS_SIZE
    placed = []
    for p in planned:
        counter = allocate_counter(counters, cave) if p.needs_counter else 0
        counters.append(counter)
        estimate = p.trampoline(cave.address + code_size // 2, counter).size + TRAMPOLINE_SLACK
        slot = allocate(taken, cave.address, code_size, estimate)
        layout = p.trampoline(slot, counter)
        if layout.size > estimate:
            raise MicropatchError(
                f"{p.where}: trampoline grew from {estimate} to {layout.size} bytes"
            )
        taken.append((slot, layout.end))
        placed.append((p, layout, counter))
    return placed


def _who_hooks(caves: list[Cave], low: int, high: int) -> str:
    for cave in caves:
        for patch in cave.registry.patches:
            for s in patch.sites:
                if s.address < high and low < s.address + len(s.original):
                    return f": patch {patch.id} v{patch.version} already patches {s.address:#x}"
    return (
        ": is another patch or tool (a debugger breakpoint, a hooking library) already "
        "hooking this function?"
    )
