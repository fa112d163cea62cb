"""What a patcher killed mid-operation leaves behind, completed or rolled back.

Run at the start of every transaction, inside the stop, before anything else
(and by `micropatch repair`). It reads only the process: the registry's
states, the bytes at the sites, the trampolines' checksums, the caves' maps
and the target's file descriptors.

- `removing`: restore every site that still holds the patch's jump; retire
  the patch's trampolines.
- `applying`: if every trampoline is intact and every site holds either its
  original bytes or the patch's jump, write the missing jumps and mark it
  `applied` (roll forward: the operation completes); otherwise restore the
  jumps already written and retire it (roll back).
- a cave whose registry was never written: its creator died before anything
  referred to it; unmapped.
- a memfd named `micropatch` still open in the target: its creator died
  between memfd_create and close; closed.

`removing` entries are handled before `applying` ones: an interrupted update
records both, and the old patch's sites must be restored before the new
patch's are judged.
"""

from __future__ import annotations

import contextlib
import logging
import os
import zlib

from micropatch.arch.x86_64.abi import SYS_CLOSE, SYS_MUNMAP
from micropatch.live.cave import CAVE_SIZE, orphan_caves, read_caves
from micropatch.live.commit import reclaim, store
from micropatch.live.module import CAVE_PREFIX
from micropatch.live.registry import APPLIED, APPLYING, REMOVING, AppliedPatch
from micropatch.live.safety import thread_inside
from micropatch.live.transaction import Transaction
from micropatch.process.maps import Mapping
from micropatch.process.world import StoppedProcess

log = logging.getLogger(__name__)

MEMFD_LINK = "/memfd:micropatch (deleted)"


def needs_recovery(
    proc: StoppedProcess, mappings: list[Mapping], *, retired: bool = False
) -> bool:
    """Whether anything is left to resolve (with `retired`, trampolines to free too)."""
    caves = read_caves(proc.memory, mappings)
    return bool(
        any(p.state != APPLIED for c in caves for p in c.registry.patches)
        or (retired and any(c.registry.retired for c in caves))
        or orphan_caves(proc.memory, mappings, caves)
        or leaked_fds(proc.pid)
    )


def recover(
    proc: StoppedProcess, mappings: list[Mapping], *, retired: bool = False
) -> list[str]:
    """Bring the process to a consistent state; what was done, for the log and events.

    `retired`: also free retired trampolines no thread uses any more (and unmap a
    cave left empty); every operation does that at its end anyway."""
    if not needs_recovery(proc, mappings, retired=retired):
        return []
    done: list[str] = []
    changed: list[int] = []
    caves = read_caves(proc.memory, mappings)
    tx = Transaction(proc, mappings)
    try:
        for cave in caves:
            for patch in [p for p in cave.registry.patches if p.state == REMOVING]:
                _restore(tx, patch)
                cave.registry.retire(patch)
                changed.append(cave.address)
                done.append(f"completed the removal of {patch.id} v{patch.version}")
        for cave in caves:
            for patch in [p for p in cave.registry.patches if p.state == APPLYING]:
                changed.append(cave.address)
                if _can_complete(tx, patch):
                    for site in patch.sites:
                        if tx.memory.read(site.address, len(site.jump)) != site.jump:
                            tx.write(site.address, site.jump)
                    patch.state = APPLIED
                    done.append(f"completed the application of {patch.id} v{patch.version}")
                else:
                    _restore(tx, patch)
                    cave.registry.retire(patch)
                    done.append(f"rolled back the application of {patch.id} v{patch.version}")
            if cave.address in changed:
                store(tx, cave)
        for fd in leaked_fds(proc.pid):
            tx.syscalls(SYS_CLOSE, fd)
            done.append(f"closed a leaked cave descriptor (fd {fd})")
        for orphan in orphan_caves(proc.memory, mappings, caves):
            tx.syscalls(SYS_MUNMAP, orphan, CAVE_SIZE)
            done.append(f"unmapped an unrecorded cave at {orphan:#x}")
        before = sum(len(c.registry.retired) for c in caves)
        reclaim(tx, caves, everything=retired)
        freed = before - sum(len(c.registry.retired) for c in caves)
        if freed:
            done.append(f"freed {freed} retired trampoline{'s' if freed != 1 else ''}")
    except BaseException:
        tx.rollback()
        raise
    finally:
        tx.close()
    for line in done:
        log.info("process %d: recovery: %s", proc.pid, line)
    return done


def _restore(tx: Transaction, patch: AppliedPatch) -> None:
    for site in patch.sites:
        if tx.memory.read(site.address, len(site.jump)) == site.jump:
            tx.write(site.address, site.original)


def _can_complete(tx: Transaction, patch: AppliedPatch) -> bool:
    """Roll forward only if every trampoline is intact, every site holds its original
    bytes or its jump, and no thread has since stopped inside a site still to be
    jumped (the process ran after the kill; rolling back needs no such check, since
    no thread can be inside a jump past its first byte)."""
    unjumped = []
    for site in patch.sites:
        code = tx.memory.read(site.trampoline, site.trampoline_size)
        if not site.code_hash or f"{zlib.crc32(code):08x}" != site.code_hash:
            return False
        found = tx.memory.read(site.address, len(site.jump))
        if found not in (site.original, site.jump):
            return False
        if found == site.original:
            unjumped.append((site.address, site.address + len(site.original)))
    return thread_inside(tx.proc, unjumped) is None


def leftovers(pid: int) -> bool:
    """Whether a killed patcher left anything in the process, read without stopping it.

    Sound while the caller holds the process's lock (`live.lock`): no other
    operation can be changing the registries, so what is read is what the stop
    will find; the stop checks again anyway before it changes anything."""
    from micropatch.process.maps import read_maps
    from micropatch.process.memory import Memory

    mappings = read_maps(pid)
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

