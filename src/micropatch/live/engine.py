"""apply, remove, update: one transaction on one process each.

Resolve and plan with the process running; then stop every thread, check
that it is safe, prepare the cave, commit the site jumps and the registry,
read everything back, and resume. If a thread is in the way, resume, wait a
moment and try again; any error rolls back to the untouched state.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from micropatch.errors import (
    AlreadyApplied,
    Downgrade,
    MicropatchError,
    NotApplied,
    ProcessError,
    ProcessExited,
    ProcessNotFound,
    StopTimeout,
    UnsafeToPatch,
)
from micropatch.faults import checkpoint
from micropatch.live import commit
from micropatch.live.cave import Cave, cave_of, read_caves
from micropatch.live.lock import queued
from micropatch.live.module import LoadedModule, ModuleCache, find_module, symbol_address
from micropatch.live.recovery import leftovers, recover
from micropatch.live.registry import APPLIED, REMOVING, AppliedPatch
from micropatch.live.safety import Entering, Unsafe, place_threads
from micropatch.live.transaction import Transaction
from micropatch.process.maps import Mapping, read_maps
from micropatch.process.memory import Memory
from micropatch.process.procfs import check_alive
from micropatch.process.world import (
    STOP_TIMEOUT,
    StoppedProcess,
    exists,
    held_world,
    stop_world,
)

if TYPE_CHECKING:  # the planner (and the assembler) are loaded by apply and update only
    from micropatch.build.plan import PlannedSite
    from micropatch.trust.policy import Admitted

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 20
RETRY_DELAY = 0.002  # doubled after each unsafe attempt, capped below
MAX_RETRY_DELAY = 0.05


@dataclass(frozen=True)
class Outcome:
    pid: int
    patch_id: str
    action: str  # "applied", "removed", "updated"
    version: int | None
    sites: int
    attempts: int
    paused: float  # seconds the target was stopped, in the successful attempt
    moved: int = 0  # threads moved between a site and its relocated copy, in that attempt


@dataclass(frozen=True)
class _Change:
    pid: int
    add: Admitted | None
    remove: str | None
    modules: ModuleCache | None = None
    stop_timeout: float = STOP_TIMEOUT


def apply(
    patch: Admitted,
    pid: int,
    *,
    retries: int = DEFAULT_RETRIES,
    modules: ModuleCache | None = None,
    stop_timeout: float = STOP_TIMEOUT,
) -> Outcome:
    """Apply every patchlet of `patch` to process `pid`, or none of them.

    `modules`: a cache of parsed module files to share between calls (`--all`).
    `stop_timeout`: seconds every thread may take to stop; an attempt in which one
    does not is retried like one in which a thread is in the way (`retries`)."""
    return _run(_Change(pid, patch, None, modules, stop_timeout), retries)


def remove(
    patch_id: str,
    pid: int,
    *,
    retries: int = DEFAULT_RETRIES,
    stop_timeout: float = STOP_TIMEOUT,
) -> Outcome:
    """Restore the original code of every site of an applied patch."""
    return _run(_Change(pid, None, patch_id, stop_timeout=stop_timeout), retries)


def update(
    patch: Admitted,
    pid: int,
    *,
    retries: int = DEFAULT_RETRIES,
    modules: ModuleCache | None = None,
    stop_timeout: float = STOP_TIMEOUT,
) -> Outcome:
    """Replace the applied version of `patch.id` by this newer one, in one stop."""
    return _run(_Change(pid, patch, patch.id, modules, stop_timeout), retries)


def repair(pid: int) -> list[str]:
    """Complete or roll back whatever a killed patcher left in process `pid`
    (every other operation does this first, too); what was done."""
    check_alive(pid)
    try:
        with queued(pid), stop_world(pid) as proc:
            return recover(proc, read_maps(pid), retired=True)
    except ProcessNotFound:
        raise ProcessExited(f"process {pid} exited during the operation") from None


@contextmanager
def holding(
    pid: int, held: Collection[int], *, stop_timeout: float = STOP_TIMEOUT
) -> Iterator[StoppedProcess]:
    """A stop of process `pid` for a caller whose thread already holds the threads
    `held` in a ptrace stop (an exec event or system call exit stop): takes the
    process's lock (`live.lock`), stops every other thread, and yields the stopped
    process for `apply_held`. When the block ends, the other threads are let go
    and the held ones stay stopped, traced by the caller, with the registers the
    transactions decided (see `process.world.held_world`)."""
    try:
        with queued(pid), held_world(pid, held, timeout=stop_timeout) as proc:
            yield proc
    except ProcessNotFound:
        raise ProcessExited(f"process {pid} exited during the operation") from None


def apply_held(
    patch: Admitted, proc: StoppedProcess, *, modules: ModuleCache | None = None
) -> Outcome:
    """Apply `patch` inside a stop the caller holds (`holding`): the same transaction
    as `apply` (recovery first, checks, cave, trampolines, registry, jumps, read-back,
    rollback on any error), without detaching anything. No retries: a thread in
    the way raises UnsafeToPatch at once, nothing changed."""
    from micropatch.build.plan import plan_patch

    change = _Change(proc.pid, patch, None, modules)
    try:
        mappings = read_maps(proc.pid)
        cache = modules or ModuleCache()
        module = find_module(proc.pid, mappings, patch.patch.target, cache)
        planned = plan_patch(
            patch.patch,
            module,
            patch.toolchain,
            lambda location: symbol_address(proc.pid, mappings, location, cache),
        )
        _forget_remapped(proc, mappings, module)
        try:
            sites, moved = _transact(proc, change, module, planned, leftovers(proc.pid))
        except Unsafe as e:
            raise UnsafeToPatch(
                f"process {proc.pid}: not safe now: {e}; nothing was changed"
            ) from e
    except ProcessNotFound:
        raise ProcessExited(f"process {proc.pid} exited during the operation") from None
    except MicropatchError as e:
        e.within(pid=proc.pid, patch_id=patch.id)
        raise
    paused = time.perf_counter() - proc.stopped_at
    log.info(
        "process %d: applied %s in a held stop (%d sites, %d threads moved)",
        proc.pid, patch.id, sites, moved,
    )  # fmt: skip
    return Outcome(proc.pid, patch.id, "applied", patch.version, sites, 1, paused, moved)


def _forget_remapped(proc: StoppedProcess, mappings: list[Mapping], module: LoadedModule) -> None:
    """Forget what a registry records as applied to a module that has since been unloaded
    and loaded again at the same address (dlclose, then dlopen): every site holds the
    module file's own bytes again, none holds its jump. The registry describes the
    previous mapping; left as is, it would make the new one look patched. Its patches
    are retired (their trampolines freed once no thread can be in them), in one
    registry write: a patcher killed before it leaves the registry as it was."""
    cave = cave_of(read_caves(proc.memory, mappings), module)
    if cave is None:
        return
    stale = [
        p
        for p in cave.registry.patches
        if p.state == APPLIED
        and p.sites
        and all(
            s.original != s.jump and proc.memory.read(s.address, len(s.original)) == s.original
            for s in p.sites
        )
    ]
    if not stale:
        return
    tx = Transaction(proc, mappings)
    try:
        for patch in stale:
            cave.registry.retire(patch)
            log.info(
                "process %d: %s was applied to an earlier mapping of %s at the same address; "
                "forgotten", proc.pid, patch.id, module.path,
            )  # fmt: skip
        commit.store(tx, cave)
        tx.verify()
    except BaseException:
        tx.rollback()
        raise
    finally:
        tx.close()


def _run(change: _Change, retries: int) -> Outcome:
    patch_id = change.add.id if change.add else change.remove
    try:
        # One operation per process at a time: wait for the lock of this pid
        # (live/lock.py) rather than meet a process another operation has stopped.
        with queued(change.pid):
            return _attempts(change, retries)
    except MicropatchError as e:
        e.within(pid=change.pid, patch_id=patch_id)
        raise


def _attempts(change: _Change, retries: int) -> Outcome:
    check_alive(change.pid)
    module = planned = None
    if change.add is not None:
        from micropatch.build.plan import plan_patch

        mappings = read_maps(change.pid)
        modules = change.modules or ModuleCache()
        module = find_module(change.pid, mappings, change.add.patch.target, modules)
        planned = plan_patch(
            change.add.patch,
            module,
            change.add.toolchain,
            lambda location: symbol_address(change.pid, mappings, location, modules),
        )
        _prepare(change.pid, module, planned)
    # Read before the stop (the lock keeps it true): most processes have nothing to
    # recover, and they should not pay for looking while stopped.
    dirty = leftovers(change.pid)
    delay = RETRY_DELAY
    reason = ""
    timeout: StopTimeout | None = None
    for attempt in range(1, retries + 2):
        try:
            with stop_world(change.pid, timeout=change.stop_timeout) as proc:
                sites, moved = _transact(proc, change, module, planned, dirty)
            paused = proc.paused
        except ProcessNotFound:
            raise ProcessExited(f"process {change.pid} exited during the operation") from None
        except (Unsafe, StopTimeout) as e:
            reason = str(e)
            timeout = e if isinstance(e, StopTimeout) else None
            log.debug(
                "process %d: attempt %d unsafe (%s); retry in %.0f ms",
                change.pid,
                attempt,
                reason,
                delay * 1e3,
            )
            time.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_DELAY)
            continue
        action = (
            "applied" if change.remove is None else "removed" if change.add is None else "updated"
        )
        version = change.add.version if change.add else None
        patch_id = change.add.id if change.add else str(change.remove)
        log.info(
            "process %d: %s %s (%d sites, %d attempts, %d threads moved, paused %.3f ms)",
            change.pid, action, patch_id, sites, attempt, moved, paused * 1e3,
        )  # fmt: skip
        return Outcome(change.pid, patch_id, action, version, sites, attempt, paused, moved)
    if timeout is not None:
        raise timeout.within(f"gave up after {retries + 1} attempts; in the last, ")
    raise UnsafeToPatch(
        f"process {change.pid}: not safe after {retries + 1} attempts: {reason}; "
        "nothing was changed. The code is in constant use; try again, or with more --retries"
    )


def _transact(
    proc: StoppedProcess,
    change: _Change,
    module: LoadedModule | None,
    planned: list[PlannedSite] | None,
    dirty: bool = True,
) -> tuple[int, int]:
    """Returns the number of sites now patched and the number of threads moved.
    `dirty`: a killed patcher may have left something to recover first."""
    mappings = read_maps(proc.pid)
    if dirty and recover(proc, mappings):
        mappings = read_maps(proc.pid)
    checkpoint("stopped")
    caves = read_caves(proc.memory, mappings)
    old_cave, old = _find_applied(caves, change.remove) if change.remove else (None, None)
    _check(proc, change, caves, old)
    placement = place_threads(
        proc, [Entering(p.site, p.resume is None, p.where) for p in planned or []]
    )
    tx = Transaction(proc, mappings)
    try:
        if change.add is not None and module is not None and planned is not None:
            patch = change.add.patch
            commit.check_originals(tx, caves, patch, planned, old)
            cave = cave_of(caves, module) or commit.new_cave(tx, caves, module)
            checkpoint("cave-ready")
            new, layouts = commit.write_trampolines(tx, cave, patch, planned)
            cave.registry.patches.append(new)
            if old is not None and old_cave is not None:
                old.state = REMOVING
                if old_cave is not cave:
                    commit.store(tx, old_cave)
            commit.store(tx, cave)
            checkpoint("intent-recorded")
            commit.move_threads(tx, placement.pending, layouts)
            if old is not None and old_cave is not None:
                commit.restore_sites(tx, old)
                old_cave.registry.retire(old)
            commit.write_jumps(tx, new)
            new.state = APPLIED
            if old_cave is not None and old_cave is not cave:
                commit.store(tx, old_cave)
            commit.store(tx, cave)
            count = len(new.sites)
        else:
            assert old is not None and old_cave is not None
            old.state = REMOVING
            commit.store(tx, old_cave)
            checkpoint("intent-recorded")
            commit.restore_sites(tx, old)
            old_cave.registry.retire(old)
            commit.store(tx, old_cave)
            count = len(old.sites)
        checkpoint("committed")
        commit.reclaim(tx, caves)  # verifies every write; unmaps an emptied cave last
    except BaseException:
        failures = tx.rollback()
        if failures and not exists(proc.pid):
            raise ProcessExited(f"process {proc.pid} exited during the operation") from None
        if failures:
            raise ProcessError(
                f"process {proc.pid}: rollback failed ({failures[0]}); the process may be "
                "half-patched, check `micropatch status`"
            ) from None
        raise
    finally:
        tx.close()
    return count, len(placement.pending)


def _check(
    proc: StoppedProcess, change: _Change, caves: list[Cave], old: AppliedPatch | None
) -> None:
    """Refuse what makes no sense, from the registry read inside the stop."""
    if change.remove and old is None:
        applied = ", ".join(f"{p.id} v{p.version}" for c in caves for p in c.registry.patches)
        raise NotApplied(
            f"patch {change.remove} is not applied to process {proc.pid} "
            f"({proc.status.name}); applied there: {applied or 'none'}"
        )
    if change.add is not None and change.remove is None:
        _, existing = _find_applied(caves, change.add.id)
        if existing is not None:
            raise AlreadyApplied(
                f"patch {change.add.id} version {existing.version} is already applied to process "
                f"{proc.pid}; use `micropatch update` to replace it"
            )
    if change.add is not None and old is not None and old.version == change.add.version:
        raise AlreadyApplied(
            f"patch {change.add.id} version {old.version} is already applied to process "
            f"{proc.pid}; nothing to update"
        )
    if change.add is not None and old is not None and old.version > change.add.version:
        raise Downgrade(
            f"patch {change.add.id} version {old.version} is applied to process {proc.pid}, "
            f"newer than version {change.add.version}: update refuses a downgrade; to go "
            f"back, `micropatch remove {change.add.id}` then apply the older version"
        )


def _find_applied(
    caves: list[Cave], patch_id: str | None
) -> tuple[Cave | None, AppliedPatch | None]:
    for cave in caves:
        found = cave.registry.find(patch_id) if patch_id else None
        if found is not None:
            return cave, found
    return None, None


def _prepare(pid: int, module: LoadedModule, planned: list[PlannedSite]) -> None:
    """Lay the trampolines out once before stopping, so that their bodies are assembled
    (and cached) while the process still runs; in the stop, the same layout is a cache hit."""
    with Memory(pid, writable=False) as memory:
        cave = cave_of(read_caves(memory, read_maps(pid)), module)
    if cave is not None:
        with contextlib.suppress(MicropatchError):  # the real layout will report it
            commit.layout_all(cave, planned)


