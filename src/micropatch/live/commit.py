"""The ordered writes of one transaction, each step one the target survives.

Every step below is taken with all threads stopped, through a journal
(`Transaction`) that undoes it on any error. What is written was decided
beforehand (`live.decide.Commit`); the order is what makes the patcher's own
death harmless at any instant (see docs/engine.md, "Crash consistency"):

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
from collections.abc import Collection

from micropatch.arch import TrampolineLayout
from micropatch.errors import OriginalBytesMismatch
from micropatch.faults import checkpoint
from micropatch.live.cave import CAVE_SIZE, Cave, map_cave, unmap_cave
from micropatch.live.decide import Commit, SiteCheck, record
from micropatch.live.mapped import LoadedModule
from micropatch.live.registry import LAYOUT, AppliedPatch, Layout, Registry
from micropatch.live.safety import PendingMove, in_use, into_copy
from micropatch.live.transaction import Transaction

log = logging.getLogger(__name__)


def execute(tx: Transaction, commit: Commit, pending: list[PendingMove]) -> None:
    """Make the commit's writes in their order. First, that every site holds what the
    commit was decided against: if not, nothing is written."""
    if commit.new is not None:
        check_sites(tx, commit.checks, commit.caves, commit.new.id, commit.new)
    if commit.new is not None:
        checkpoint("cave-ready")
    for address, data in commit.trampolines:
        tx.write(address, data)
    if commit.new is not None:
        checkpoint("trampolines-written")
    for address, data in commit.intent:
        tx.write(address, data)
    checkpoint("intent-recorded")
    move_threads(tx, pending, commit.layouts)
    if commit.old is not None:
        # An update's jump replaces the old one's in place where both patch the same
        # bytes: the code is never unpatched there, even for the patcher's death.
        replaced = {(s.address, len(s.jump)) for s in commit.new.sites} if commit.new else set()
        restore_sites(tx, commit.old, replaced)
    if commit.new is not None:
        write_jumps(tx, commit.new)
    for address, data in commit.result:
        tx.write(address, data)
    checkpoint("committed")


def check_sites(
    tx: Transaction,
    checks: list[SiteCheck],
    caves: list[Cave],
    patch_id: str,
    applying: AppliedPatch | None = None,
) -> None:
    """Every site holds the module file's bytes (or the replaced patch's jump):
    nothing else hooks it. `applying`: the patch these checks are for, if the
    registries already list it."""
    for check in checks:
        found = tx.memory.read(check.address, len(check.expected))
        if found != check.expected:
            raise OriginalBytesMismatch(
                f"patch {patch_id}, {check.where}: site {check.address:#x} in process "
                f"{tx.proc.pid} holds {found.hex(' ')}, the patch expects "
                f"{check.expected.hex(' ')}"
                + _who_hooks(caves, check.address, check.address + len(check.expected), applying)
            )


def store(tx: Transaction, cave: Cave) -> None:
    """Write the cave's registry into the slot that does not hold the current one."""
    for address, data in record(cave):
        tx.write(address, data)


def new_cave(
    tx: Transaction, caves: list[Cave], module: LoadedModule, layout: Layout = LAYOUT
) -> Cave:
    """Map a cave near the module; unmapped again on rollback. (An earlier `layout`
    only in tests: an upgrade finds such caves in running processes.)"""
    address = map_cave(tx.syscalls, tx.memory, tx.mappings, module, layout)
    registry = Registry(
        module_path=module.path,
        module_base=module.base,
        build_id=module.identity.build_id,
        sha256=module.identity.sha256,
        cave_size=CAVE_SIZE,
        layout=layout,
    )
    cave = Cave(address, CAVE_SIZE, registry)
    caves.append(cave)
    tx.on_rollback(lambda: unmap_cave(tx.syscalls, cave))
    return cave


def move_threads(
    tx: Transaction, pending: list[PendingMove], layouts: list[TrampolineLayout]
) -> None:
    """Threads stopped at a displaced instruction go to its copy, now: the copy is
    written and recorded, so they run correctly whether or not the jump follows."""
    for move in pending:
        move_thread(tx, move.tid, into_copy(move, layouts[move.index], tx.proc.regs(move.tid)))
    if pending:
        checkpoint("threads-moved")


def move_thread(tx: Transaction, tid: int, rip: int) -> None:
    """Set a stopped thread's instruction pointer at once; moved back on rollback."""
    regs = tx.proc.regs(tid)
    before = regs.rip
    regs.rip = rip
    log.debug("process %d: thread %d moves from %#x to %#x", tx.proc.pid, tid, before, rip)
    tx.proc.set_regs(tid, regs)

    def undo() -> None:
        back = tx.proc.regs(tid)
        back.rip = before
        tx.proc.set_regs(tid, back)

    tx.on_rollback(undo)


def write_jumps(tx: Transaction, patch: AppliedPatch) -> None:
    for index, site in enumerate(patch.sites):
        tx.write(site.address, site.jump)
        checkpoint("jump-{index}-written", index=index)


def restore_sites(
    tx: Transaction, patch: AppliedPatch, replaced: Collection[tuple[int, int]] = ()
) -> None:
    """Put back the original bytes of the patch's sites, but for `replaced` ones
    ((address, length) of the jumps that will overwrite them)."""
    for index, site in enumerate(patch.sites):
        if (site.address, len(site.jump)) in replaced:
            continue
        found = tx.memory.read(site.address, len(site.jump))
        if found != site.jump:
            raise OriginalBytesMismatch(
                f"site {site.address:#x} of patch {patch.id} in process {tx.proc.pid} holds "
                f"{found.hex(' ')} instead of micropatch's jump {site.jump.hex(' ')}: another tool "
                "has rewritten it; not removing"
            )
        tx.write(site.address, site.original)
        checkpoint("site-{index}-restored", index=index)


def needs_reclaim(cave: Cave) -> bool:
    """Whether proving the cave's retired trampolines free pays now: the cave is left
    without patches (to unmap it), or they take more than a quarter of it."""
    retired = cave.registry.retired
    crowded = sum(r.size for r in retired) * 4 > cave.size
    return bool(retired) and (crowded or not cave.registry.patches)


def finish(
    tx: Transaction, caves: list[Cave], *, everything: bool = False, unmap: bool = True
) -> list[Cave]:
    """Free retired trampolines no thread can be in any more; read every write back;
    unmap caves left empty, or, without `unmap`, return them for the caller to unmap
    once the stop is over (`live.provision.release`).

    Proving a trampoline free means scanning every thread's stack, so it is done
    only where it pays (`needs_reclaim`), or for `everything` (repair). The unmap
    comes last: the one step the journal cannot undo.
    """
    emptied = []
    for cave in caves:
        retired = cave.registry.retired
        if retired and (everything or needs_reclaim(cave)):
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
    if not unmap:
        return emptied
    for cave in emptied:
        unmap_cave(tx.syscalls, cave)
        checkpoint("cave-unmapped")
    return []


def _who_hooks(caves: list[Cave], low: int, high: int, applying: AppliedPatch | None) -> str:
    for cave in caves:
        for patch in cave.registry.patches:
            if patch is applying:
                continue
            for s in patch.sites:
                if s.address < high and low < s.address + len(s.original):
                    return f": patch {patch.id} v{patch.version} already patches {s.address:#x}"
    return (
        ": is another patch or tool (a debugger breakpoint, a hooking library) already "
        "hooking this function?"
    )
