"""What a patcher killed mid-operation leaves behind, completed or rolled back.

Run at the start of every transaction that finds something left, inside the
stop, before anything else (and by `micropatch repair`). It reads only the
process: the registry's states, the bytes at the sites, the trampolines'
checksums, the caves' maps and the target's file descriptors.

- `removing`: restore every site that still holds the patch's jump; retire
  the patch's trampolines.
- `applying`: if every trampoline is intact and every site holds either its
  original bytes or the patch's jump, write the missing jumps and mark it
  `applied` (roll forward: the operation completes). A thread stopped since
  inside a site still to be jumped, at one of its displaced instructions, is
  moved into the trampoline's copy first, as apply does. Otherwise (a
  trampoline damaged, foreign bytes, a thread inside a site with no copy)
  restore the jumps already written and retire it (roll back, always safe).
- a cave whose registry was never written: its creator died before anything
  referred to it; unmapped.
- a memfd named `micropatch` still open in the target: its creator died
  between memfd_create and close; closed.

An interrupted update records both states, the old version `removing` and
the new one `applying`, in one write. The new one is judged first, and where
its site is the old one's (same address and length) the old jump counts like
the original bytes: completing writes the new jump over it, so that site is
never unpatched, even if recovery is killed in turn; then the old version's
other sites are restored.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib
from dataclasses import dataclass, field

from micropatch.arch.x86_64.abi import SYS_CLOSE, SYS_MUNMAP
from micropatch.errors import MicropatchError
from micropatch.live.cave import CAVE_SIZE, orphan_caves, read_caves
from micropatch.live.commit import finish, move_thread, store
from micropatch.live.mapped import CAVE_PREFIX
from micropatch.live.registry import APPLIED, APPLYING, REMOVING, AppliedPatch
from micropatch.live.safety import effective_rip
from micropatch.live.transaction import Transaction
from micropatch.process.maps import Mapping, read_maps
from micropatch.process.memory import Memory
from micropatch.process.world import StoppedProcess

log = logging.getLogger(__name__)

MEMFD_LINK = "/memfd:micropatch (deleted)"


@dataclass
class Recovered:
    """What recovery did: lines for the log and events, and which interrupted
    operations ended which way (patch id, version)."""

    done: list[str] = field(default_factory=list)
    # Sites of each patch whose interrupted application was completed; of each whose
    # removal was completed or application rolled back (either way it is gone).
    applied: dict[tuple[str, int], int] = field(default_factory=dict)
    removed: dict[tuple[str, int], int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.done)


def needs_recovery(proc: StoppedProcess, mappings: list[Mapping], *, retired: bool = False) -> bool:
    """Whether anything is left to resolve (with `retired`, trampolines to free and
    empty caves to unmap too)."""
    return _left(proc.memory, proc.pid, mappings, retired=retired)


def settled(pid: int) -> bool:
    """True if `repair` would find nothing to do in process `pid` (`retired` included),
    read without stopping it, as `status` reads; False when that cannot be told (a
    registry read half written, a process that cannot be read): the caller repairs it
    in a stop then. A patcher at work meanwhile is no concern: what it may leave, the
    next command on the process resolves."""
    try:
        mappings = read_maps(pid)
        with Memory(pid, writable=False) as memory:
            return not _left(memory, pid, mappings, retired=True)
    except (MicropatchError, OSError):
        return False


def _left(memory: Memory, pid: int, mappings: list[Mapping], *, retired: bool) -> bool:
    caves = read_caves(memory, mappings)
    return bool(
        any(p.state != APPLIED for c in caves for p in c.registry.patches)
        or (retired and any(c.registry.retired or not c.registry.patches for c in caves))
        or orphan_caves(memory, mappings, caves)
        or leaked_fds(pid)
    )


def recover(proc: StoppedProcess, mappings: list[Mapping], *, retired: bool = False) -> Recovered:
    """Bring the process to a consistent state; what was done.

    `retired`: also free retired trampolines no thread uses any more (and unmap a
    cave left empty); every operation does that at its end anyway."""
    out = Recovered()
    if not needs_recovery(proc, mappings, retired=retired):
        return out
    changed: list[int] = []
    caves = read_caves(proc.memory, mappings)
    with Transaction(proc, mappings) as tx:
        removing = [(c, p) for c in caves for p in c.registry.patches if p.state == REMOVING]
        applying = [(c, p) for c in caves for p in c.registry.patches if p.state == APPLYING]
        # An update replaces the old jumps in place where both patch the same bytes.
        replaced = {(s.address, len(s.jump)): s.jump for _, p in removing for s in p.sites}
        for cave, patch in applying:
            changed.append(cave.address)
            moves = _completion(tx, patch, replaced)
            if moves is not None:
                for tid, rip in moves:
                    move_thread(tx, tid, rip)
                for site in patch.sites:
                    if tx.memory.read(site.address, len(site.jump)) != site.jump:
                        tx.write(site.address, site.jump)
                patch.state = APPLIED
                out.applied[(patch.id, patch.version)] = len(patch.sites)
                out.done.append(f"completed the application of {patch.id} v{patch.version}")
            else:
                _restore(tx, patch)
                cave.registry.retire(patch)
                out.removed[(patch.id, patch.version)] = len(patch.sites)
                out.done.append(f"rolled back the application of {patch.id} v{patch.version}")
        for cave, patch in removing:
            _restore(tx, patch)
            cave.registry.retire(patch)
            changed.append(cave.address)
            out.removed[(patch.id, patch.version)] = len(patch.sites)
            out.done.append(f"completed the removal of {patch.id} v{patch.version}")
        for cave in caves:
            if cave.address in changed:
                store(tx, cave)
        for fd in leaked_fds(proc.pid):
            tx.syscalls(SYS_CLOSE, fd)
            out.done.append(f"closed a leaked cave descriptor (fd {fd})")
        for orphan in orphan_caves(proc.memory, mappings, caves):
            tx.syscalls(SYS_MUNMAP, orphan, CAVE_SIZE)
            out.done.append(f"unmapped an unrecorded cave at {orphan:#x}")
        before = sum(len(c.registry.retired) for c in caves)
        finish(tx, caves, everything=retired)
        freed = before - sum(len(c.registry.retired) for c in caves)
        if freed:
            out.done.append(f"freed {freed} retired trampoline{'s' if freed != 1 else ''}")
    for line in out.done:
        log.info("process %d: recovery: %s", proc.pid, line)
    return out


def _restore(tx: Transaction, patch: AppliedPatch) -> None:
    for site in patch.sites:
        if tx.memory.read(site.address, len(site.jump)) == site.jump:
            tx.write(site.address, site.original)


def _completion(
    tx: Transaction, patch: AppliedPatch, replaced: dict[tuple[int, int], bytes]
) -> list[tuple[int, int]] | None:
    """The thread moves that let an interrupted application complete, or None if it
    cannot: a trampoline is not intact, a site holds neither its original bytes nor
    its jump (nor, in an update, the replaced patch's jump there: `replaced`), or a
    thread has since stopped inside a site still holding its original bytes where no
    relocated copy can take it (rolling back needs no such check: no thread can be
    inside a jump past its first byte)."""
    unjumped = []
    for site in patch.sites:
        code = tx.memory.read(site.trampoline, site.trampoline_size)
        if not site.code_hash or f"{zlib.crc32(code):08x}" != site.code_hash:
            return None
        found = tx.memory.read(site.address, len(site.jump))
        if found not in (site.original, site.jump, replaced.get((site.address, len(site.jump)))):
            return None
        if found == site.original:
            unjumped.append(site)
    moves = []
    for tid in tx.proc.threads:
        regs = tx.proc.regs(tid)
        eff = effective_rip(regs)
        for site in unjumped:
            if site.address < eff < site.address + len(site.original):
                copies = site.copies[: len(site.starts)]
                if not copies or eff not in site.starts:
                    return None
                moves.append((tid, copies[site.starts.index(eff)] + (regs.rip - eff)))
    return moves


def leftovers(pid: int, mappings: list[Mapping] | None = None) -> bool:
    """Whether a killed patcher left anything in the process, read without stopping it.

    Sound while the caller holds the process's lock (`live.lock`): no other
    operation can be changing the registries, so what is read is what the stop
    will find; the stop checks again anyway before it changes anything."""
    mappings = read_maps(pid) if mappings is None else mappings
    if leaked_fds(pid):
        return True
    if not any(m.path.startswith(CAVE_PREFIX) for m in mappings):
        return False
    with Memory(pid, writable=False) as memory:
        caves = read_caves(memory, mappings)
        return bool(
            any(p.state != APPLIED for c in caves for p in c.registry.patches)
            or orphan_caves(memory, mappings, caves)
        )


def leaked_fds(pid: int) -> list[int]:
    """Descriptors of a cave's memfd still open in the target (never, after a clean map)."""
    found = []
    with contextlib.suppress(OSError):
        for name in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{name}") == MEMFD_LINK:
                    found.append(int(name))
    return found
