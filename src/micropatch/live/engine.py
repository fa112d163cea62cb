"""apply, remove, update: one transaction on one process each.

Resolve, plan and decide with the process running (`live.prepare`; a new cave
is provisioned by one borrowed thread, `live.provision`); then stop every
thread, check that the registries are still the ones read and that no thread
is in the way, make the writes, read them back, and resume. If a thread is in
the way, resume, wait a moment and try again; any error rolls back to the
untouched state.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from micropatch.errors import (
    MicropatchError,
    ProcessError,
    ProcessExited,
    ProcessNotFound,
    StopTimeout,
    UnsafeToPatch,
)
from micropatch.faults import checkpoint
from micropatch.live import commit
from micropatch.live.cave import Cave, cave_of, read_caves
from micropatch.live.decide import Change, Commit, decide, expected_sites, find_applied, refuse
from micropatch.live.lock import queued
from micropatch.live.mapped import LoadedModule, ModuleCache, find_module, symbol_address
from micropatch.live.placed import placed
from micropatch.live.prepare import Prepared, prepare, provided, stub_range
from micropatch.live.provision import provision, release, unprovision
from micropatch.live.recovery import Recovered, recover
from micropatch.live.registry import APPLIED
from micropatch.live.safety import Entering, Unsafe, pending_call, place_threads
from micropatch.live.transaction import Transaction
from micropatch.process.maps import Mapping, read_maps
from micropatch.process.priority import realtime
from micropatch.process.procfs import check_alive
from micropatch.process.watchdog import operation
from micropatch.process.world import (
    STOP_TIMEOUT,
    StoppedProcess,
    exists,
    held_world,
    stop_world,
)

if TYPE_CHECKING:  # the planner, the assembler and the patch models load only where used
    from micropatch.elf.location import Location
    from micropatch.live.placed import Placed
    from micropatch.trust.admission import Admitted

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
    # Seconds one thread (the main one) was held alone before the stop to map a new
    # cave (`live.provision`); the other threads ran meanwhile. 0: no cave was made.
    borrowed: float = 0.0
    recovered: tuple[str, ...] = ()  # what a killed patcher left, completed or rolled back
    # The addresses of the blocked-event counters of the patch now applied, as its
    # registry records them (for a caller that keeps them, the agent, without reading
    # the registry again); None: not known (removed, or completed by recovery).
    counters: tuple[int, ...] | None = None


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
    return _run(Change(pid, patch, None, modules, stop_timeout), retries)


def remove(
    patch_id: str,
    pid: int,
    *,
    retries: int = DEFAULT_RETRIES,
    stop_timeout: float = STOP_TIMEOUT,
) -> Outcome:
    """Restore the original code of every site of an applied patch."""
    return _run(Change(pid, None, patch_id, stop_timeout=stop_timeout), retries)


def update(
    patch: Admitted,
    pid: int,
    *,
    retries: int = DEFAULT_RETRIES,
    modules: ModuleCache | None = None,
    stop_timeout: float = STOP_TIMEOUT,
) -> Outcome:
    """Replace the applied version of `patch.id` by this newer one, in one stop."""
    return _run(Change(pid, patch, patch.id, modules, stop_timeout), retries)


def repair(pid: int, *, retries: int = DEFAULT_RETRIES) -> list[str]:
    """Complete or roll back whatever a killed patcher left in process `pid`
    (every other operation does this first, too); what was done."""
    check_alive(pid)
    delay = RETRY_DELAY
    try:
        with queued(pid), operation("repair"):
            for _ in range(retries):
                try:
                    with stop_world(pid) as proc:
                        mappings = read_maps(pid)
                        pending_call(proc, stub_range(proc.memory, mappings))
                        return recover(proc, mappings, retired=True).done
                except Unsafe:
                    time.sleep(delay)
                    delay = min(delay * 2, MAX_RETRY_DELAY)
            with stop_world(pid) as proc:
                mappings = read_maps(pid)
                pending_call(proc, stub_range(proc.memory, mappings))
                return recover(proc, mappings, retired=True).done
    except Unsafe as e:
        raise UnsafeToPatch(f"process {pid}: cannot repair now: {e}; try again") from e
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
    change = Change(proc.pid, patch, None, modules)
    try:
        mappings = read_maps(proc.pid)
        module, planned = _plan(proc.pid, mappings, patch, modules or ModuleCache())
        _forget_remapped(proc, mappings, module)
        try:
            sites, moved, _, _, counters = _transact(proc, change, module, planned, None, held=True)
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
    return Outcome(
        proc.pid, patch.id, "applied", patch.version, sites, 1, paused, moved, counters=counters
    )


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
    with Transaction(proc, mappings) as tx:
        for patch in stale:
            cave.registry.retire(patch)
            log.info(
                "process %d: %s was applied to an earlier mapping of %s at the same address; "
                "forgotten", proc.pid, patch.id, module.path,
            )  # fmt: skip
        commit.store(tx, cave)
        tx.verify()


def _run(change: Change, retries: int) -> Outcome:
    try:
        # One operation per process at a time: wait for the lock of this pid
        # (live/lock.py) rather than meet a process another operation has stopped.
        verb = {"applied": "apply", "removed": "remove", "updated": "update"}[change.action]
        with queued(change.pid), operation(f"{verb} {change.patch_id}"):
            return _attempts(change, retries)
    except MicropatchError as e:
        e.within(pid=change.pid, patch_id=change.patch_id)
        raise


def _attempts(change: Change, retries: int) -> Outcome:
    """Plan, then stop, transact and resume; again after a pause while a thread is in
    the way. Each attempt reads and decides anew before its stop."""
    check_alive(change.pid)
    module = planned = None
    if change.add is not None:
        cache = change.modules or ModuleCache()
        module, planned = _plan(change.pid, read_maps(change.pid), change.add, cache)
    # From here to the end the thread is real-time once (where permitted), not once
    # per stop: a thread that drops its priority gives its CPU to whatever waits for
    # it, on a loaded machine for a time slice or more, between the borrowed thread's
    # stop and the stop of every thread. Nothing below spins (process/priority.py).
    with realtime():
        return _stops(change, module, planned, retries)


def _stops(
    change: Change,
    module: LoadedModule | None,
    planned: list[Placed] | None,
    retries: int,
) -> Outcome:
    """The attempts: provision a cave if needed, stop, transact, resume (`_attempts`)."""
    provisioned: int | None = None  # a cave made for this operation, until it holds the patch
    borrowed = 0.0  # seconds a thread was held alone, to map or unmap a cave
    delay = RETRY_DELAY
    reason = ""
    timeout: StopTimeout | None = None
    try:
        for attempt in range(1, retries + 2):
            try:
                prepared = prepare(change, module, planned)
                if prepared.needs_cave:
                    assert module is not None
                    assert planned is not None
                    provisioned, held = provision(change.pid, module, timeout=change.stop_timeout)
                    borrowed += held
                    prepared = provided(change, module, planned, prepared, provisioned)
                with stop_world(change.pid, timeout=change.stop_timeout) as proc:
                    sites, moved, recovered, emptied, counters = _transact(
                        proc, change, module, planned, prepared
                    )
            except ProcessNotFound:
                raise ProcessExited(f"process {change.pid} exited during the operation") from None
            except (Unsafe, StopTimeout) as e:
                reason = str(e)
                timeout = e if isinstance(e, StopTimeout) else None
                log.debug(
                    "process %d: attempt %d unsafe (%s); retry in %.0f ms",
                    change.pid, attempt, reason, delay * 1e3,
                )  # fmt: skip
                time.sleep(delay)
                delay = min(delay * 2, MAX_RETRY_DELAY)
                continue
            provisioned = None  # committed: the cave holds the patch, and nothing can fail now
            if emptied:
                borrowed += release(change.pid, emptied, timeout=change.stop_timeout)
            log.info(
                "process %d: %s %s (%d sites, %d attempts, %d threads moved, paused %.3f ms)",
                change.pid, change.action, change.patch_id, sites, attempt, moved,
                proc.paused * 1e3,
            )  # fmt: skip
            version = change.add.version if change.add else None
            return Outcome(
                change.pid, change.patch_id, change.action, version, sites, attempt,
                proc.paused, moved, borrowed, tuple(recovered.done), counters,
            )  # fmt: skip
    except BaseException as e:
        if provisioned is not None and not isinstance(e, ProcessExited):
            unprovision(change.pid, provisioned, timeout=change.stop_timeout)
        raise
    if provisioned is not None:
        unprovision(change.pid, provisioned, timeout=change.stop_timeout)
    if timeout is not None:
        raise timeout.within(f"gave up after {retries + 1} attempts; in the last, ")
    raise UnsafeToPatch(
        f"process {change.pid}: not safe after {retries + 1} attempts: {reason}; "
        "nothing was changed. The code is in constant use; try again, or with more --retries"
    )


def _transact(
    proc: StoppedProcess,
    change: Change,
    module: LoadedModule | None,
    planned: list[Placed] | None,
    prepared: Prepared | None,
    *,
    held: bool = False,
) -> tuple[int, int, Recovered, list[Cave], tuple[int, ...] | None]:
    """One attempt inside the stop: the number of sites now patched (or restored), the
    number of threads moved, what recovery did, the caves left empty, for the
    caller to unmap after the stop (`held`: unmapped here, the caller's stop goes on),
    and the blocked-event counters of the patch applied (None: none was written here).

    Fast path: the decision `prepared` made before the stop, once its registries are
    proved unchanged. Otherwise everything is read and decided here, after
    recovering what a killed patcher left."""
    recovered = Recovered()
    mappings: list[Mapping] | None = None
    made: Commit | None = None
    if prepared is not None and prepared.commit is not None and prepared.holds(proc.memory):
        pending_call(proc, prepared.stub)
        made = prepared.commit
    else:
        mappings = read_maps(proc.pid)
        pending_call(proc, stub_range(proc.memory, mappings))
        recovered = recover(proc, mappings)
        if recovered:
            mappings = read_maps(proc.pid)
    checkpoint("stopped")
    placement = place_threads(proc, _entering(planned))
    tx = Transaction(proc, mappings)
    try:
        if made is None:
            assert mappings is not None
            caves = read_caves(proc.memory, mappings)
            settled = _settled(change, caves, recovered)
            if settled is not None:
                return settled, 0, recovered, [], None
            if module is not None and cave_of(caves, module) is None:
                _first_cave(tx, change, caves, module, planned)
            made = decide(change, caves, proc.status.name, module, planned)
        commit.execute(tx, made, placement.pending)
        emptied = commit.finish(tx, made.caves, unmap=held)  # verifies every write
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
    counters = None if made.new is None else tuple(s.counter for s in made.new.sites if s.counter)
    return made.sites, len(placement.pending), recovered, emptied, counters


def _plan(
    pid: int, mappings: list[Mapping], patch: Admitted, modules: ModuleCache
) -> tuple[LoadedModule, list[Placed]]:
    """The patch's module in the process, and the patch placed at its address."""
    module = find_module(pid, mappings, patch.patch.target, modules)

    def external(location: Location) -> int:
        return symbol_address(pid, mappings, location, modules)

    return module, placed(patch, module, modules, external)


def _entering(planned: list[Placed] | None) -> list[Entering]:
    return [Entering(p.site, p.resume is None, p.where) for p in planned or []]


def _first_cave(
    tx: Transaction,
    change: Change,
    caves: list[Cave],
    module: LoadedModule,
    planned: list[Placed] | None,
) -> None:
    """Map the module's first cave inside the stop (a held stop, or a prepared one that
    no longer holds), once nothing else refuses the change: a refused change maps none."""
    assert planned is not None
    _, old = find_applied(caves, change.remove) if change.remove else (None, None)
    refuse(change, tx.proc.status.name, caves, old)
    commit.check_sites(tx, expected_sites(planned, old), caves, change.patch_id)
    commit.new_cave(tx, caves, module)


def _settled(change: Change, caves: list[Cave], recovered: Recovered) -> int | None:
    """Sites, if recovering what a killed patcher left already did what the change asks
    (it was interrupted doing the same): the change succeeds with nothing more to do."""
    applied = {(p.id, p.version) for c in caves for p in c.registry.patches}
    if change.add is not None:
        key = (change.add.id, change.add.version)
        return recovered.applied.get(key) if key in applied else None
    gone = [n for (i, _), n in recovered.removed.items() if i == change.remove]
    if gone and not any(i == change.remove for i, _ in applied):
        return gone[0]
    return None
