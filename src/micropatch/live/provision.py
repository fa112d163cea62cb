"""Caves mapped before the stop and unmapped after it, by one borrowed thread.

Making a cave takes system calls in the target (`live.cave.map_cave`), and each
is a round trip through a borrowed thread that must be scheduled twice: inside
the stop they would keep every thread waiting, and under load for scheduling
slices. Nothing running can reach a new cave, though: no site jumps to it and
no registry names it until the transaction writes both, with every thread
stopped. So the cave is provisioned first with only one thread stopped
(`process.world.lone_thread`) and recorded at once with an empty registry;
the stop then finds it like any existing cave.

The writes made while the other threads run reach nothing they execute: the
system call stub goes into padding no code reaches, its frame below the
borrowed thread's own stack pointer, the registry into the new cave.

If the patcher dies here, what it leaves is what `live.recovery` and every
transaction clean up: a leaked descriptor, a cave with no registry, or an empty
cave (unmapped by the next transaction that does not use it, or by `repair`).
If the operation fails afterwards, `unprovision` unmaps the cave again.

The other end is the same: a cave a removal leaves empty is unmapped after
the stop (`release`), by one borrowed thread.
"""

from __future__ import annotations

import logging

from micropatch.errors import MicropatchError
from micropatch.faults import checkpoint
from micropatch.live.cave import CAVE_SIZE, Cave, unmap_cave
from micropatch.live.commit import new_cave, store
from micropatch.live.mapped import LoadedModule
from micropatch.live.registry import Registry
from micropatch.live.transaction import Transaction
from micropatch.process.world import STOP_TIMEOUT, lone_thread

log = logging.getLogger(__name__)


def provision(
    pid: int, module: LoadedModule, *, timeout: float = STOP_TIMEOUT
) -> tuple[int, float]:
    """Map and record an empty cave for `module`; its address, and the seconds one
    thread of the process was held for it."""
    with lone_thread(pid, timeout=timeout) as proc:
        tx = Transaction(proc)
        try:
            cave = new_cave(tx, [], module)
            store(tx, cave)
            tx.verify()
        except BaseException:
            tx.rollback()
            raise
        finally:
            tx.close()
    log.debug("process %d: cave at %#x provisioned for %s", pid, cave.address, module.path)
    return cave.address, proc.paused


def unprovision(pid: int, address: int, *, timeout: float = STOP_TIMEOUT) -> None:
    """Unmap the cave `provision` made, if it is still empty: the operation it was made
    for failed. Best effort: an empty cave left behind is harmless, and the next
    transaction (or `repair`) unmaps it."""
    try:
        with lone_thread(pid, timeout=timeout) as proc:
            registry = Registry.read(lambda offset, size: proc.memory.read(address + offset, size))
            if registry is not None and (registry.patches or registry.retired):
                return
            tx = Transaction(proc)
            try:
                unmap_cave(tx.syscalls, Cave(address, CAVE_SIZE, registry or _empty()))
            finally:
                tx.close()
    except MicropatchError as e:
        log.warning("process %d: the empty cave at %#x stays mapped: %s", pid, address, e)


def release(pid: int, caves: list[Cave], *, timeout: float = STOP_TIMEOUT) -> float:
    """Unmap caves a transaction left empty, after its stop: the stop proved that no
    thread's instruction pointer or stack refers to them and no site jumps to them, so
    nothing can enter them again; one borrowed thread makes the calls while the others
    run. The seconds it was held. Best effort: a cave left (the patcher killed first,
    the process busy) holds no patch, and the next transaction (or `repair`) unmaps it."""
    try:
        with lone_thread(pid, timeout=timeout) as proc:
            tx = Transaction(proc)
            try:
                for cave in caves:
                    unmap_cave(tx.syscalls, cave)
                    checkpoint("cave-unmapped")
            finally:
                tx.close()
    except MicropatchError as e:
        log.warning("process %d: an emptied cave stays mapped for now: %s", pid, e)
        return 0.0
    return proc.paused


def _empty() -> Registry:
    return Registry("", 0, None, "", CAVE_SIZE)
