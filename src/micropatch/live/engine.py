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
from dataclasses import dataclass

from micropatch.arch import TrampolineLayout
from micropatch.build.plan import PlannedSite, plan_patch
from micropatch.errors import (
    AlreadyApplied,
    Downgrade,
    MicropatchError,
    NotApplied,
    OriginalBytesMismatch,
    ProcessError,
    ProcessExited,
    ProcessNotFound,
    StopTimeout,
    UnsafeToPatch,
)
from micropatch.live.cave import (
    CAVE_SIZE,
    COUNTER_SIZE,
    COUNTERS_SIZE,
    Cave,
    allocate,
    allocate_counter,
    cave_of,
    map_cave,
    read_caves,
    unmap_cave,
)
from micropatch.live.module import LoadedModule, ModuleCache, find_module, symbol_address
from micropatch.live.registry import AppliedPatch, AppliedSite, Registry
from micropatch.live.safety import Entering, Unsafe, into_copy, place_threads
from micropatch.live.transaction import Transaction
from micropatch.process.maps import read_maps
from micropatch.process.memory import Memory
from micropatch.process.procfs import check_alive
from micropatch.process.world import STOP_TIMEOUT, StoppedProcess, exists, stop_world
from micropatch.trust.policy import Admitted

log = logging.getLogger(__name__)

DEFAULT_RETRIES = 20
RETRY_DELAY = 0.002  # doubled after each unsafe attempt, capped below
MAX_RETRY_DELAY = 0.05
TRAMPOLINE_SLACK = 32  # body encodings may differ by a few bytes between two addresses


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


def _run(change: _Change, retries: int) -> Outcome:
    patch_id = change.add.id if change.add else change.remove
    try:
        return _attempts(change, retries)
    except MicropatchError as e:
        e.within(pid=change.pid, patch_id=patch_id)
        raise


def _attempts(change: _Change, retries: int) -> Outcome:
    check_alive(change.pid)
    module = planned = None
    if change.add is not None:
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
    delay = RETRY_DELAY
    reason = ""
    timeout: StopTimeout | None = None
    for attempt in range(1, retries + 2):
        try:
            with stop_world(change.pid, timeout=change.stop_timeout) as proc:
                sites, moved = _transact(proc, change, module, planned)
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
) -> tuple[int, int]:
    """Returns the number of sites now patched and the number of threads moved."""
    mappings = read_maps(proc.pid)
    caves = read_caves(proc.memory, mappings)
    old_cave, old = _find_applied(caves, change.remove) if change.remove else (None, None)
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
    entering = [Entering(p.site, p.resume is None, p.where) for p in planned or []]
    placement = place_threads(
        proc, mappings, entering, old.sites if old else [], str(change.remove)
    )

    tx = Transaction(proc, mappings)
    try:
        if old_cave is not None and old is not None:
            _remove_sites(tx, old_cave, old)
        count = len(old.sites) if old else 0
        if change.add is not None and module is not None and planned is not None:
            cave = cave_of(caves, module)
            layouts = _add_sites(tx, caves, cave, module, change.add, planned)
            for move in placement.pending:
                placement.moves[move.tid] = into_copy(move, layouts[move.index])
            count = len(planned)
        elif old_cave is not None:
            _store(tx, old_cave)
        tx.verify()
        for tid, rip in placement.moves.items():
            _move(tx, tid, rip)
        for emptied in [c for c in caves if not c.registry.patches]:
            unmap_cave(tx.syscalls, emptied)  # last: the one step we could not undo
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
    return count, len(placement.moves)


def _find_applied(
    caves: list[Cave], patch_id: str | None
) -> tuple[Cave | None, AppliedPatch | None]:
    for cave in caves:
        found = cave.registry.find(patch_id) if patch_id else None
        if found is not None:
            return cave, found
    return None, None


def _move(tx: Transaction, tid: int, rip: int) -> None:
    """Move a stopped thread to the other copy of the instruction it was about to run."""
    before = tx.proc.regs(tid).rip
    tx.proc.move(tid, rip)
    tx.on_rollback(lambda: tx.proc.move(tid, before))


def _remove_sites(tx: Transaction, cave: Cave, old: AppliedPatch) -> None:
    for site in old.sites:
        found = tx.memory.read(site.address, len(site.jump))
        if found != site.jump:
            raise OriginalBytesMismatch(
                f"site {site.address:#x} of patch {old.id} in process {tx.proc.pid} holds "
                f"{found.hex(' ')} instead of micropatch's jump {site.jump.hex(' ')}: another tool "
                "has rewritten it; not removing"
            )
        tx.write(site.address, site.original)
    cave.registry.patches.remove(old)


def _add_sites(
    tx: Transaction,
    caves: list[Cave],
    cave: Cave | None,
    module: LoadedModule,
    admitted: Admitted,
    planned: list[PlannedSite],
) -> list[TrampolineLayout]:
    """Write trampolines, jumps and registry; returns each trampoline's layout."""
    patch = admitted.patch
    for p in planned:
        found = tx.memory.read(p.site.address, p.site.length)
        if found != p.site.original:
            raise OriginalBytesMismatch(
                f"patch {patch.id}, {p.where}: site {p.site.address:#x} in process {tx.proc.pid} "
                f"holds {found.hex(' ')}, the module file has {p.site.original.hex(' ')}"
                + _who_hooks(caves, p.site.address, p.site.end)
            )
    if cave is None:
        address = map_cave(tx.syscalls, tx.memory, tx.mappings, module)
        registry = Registry(
            module_path=module.path,
            module_base=module.base,
            build_id=module.identity.build_id,
            sha256=module.identity.sha256,
            cave_size=CAVE_SIZE,
        )
        cave = new_cave = Cave(address, CAVE_SIZE, registry)
        caves.append(cave)
        tx.on_rollback(lambda: unmap_cave(tx.syscalls, new_cave))
    applied_sites = []
    layouts = []
    for p, layout, counter in _layout(cave, planned):
        tx.write(layout.address, layout.code)
        if counter:
            tx.write(counter, bytes(COUNTER_SIZE))  # a slot may have counted for an old patch
        jump = p.arch.site_jump(p.site, layout.address)
        layouts.append(layout)
        applied_sites.append(
            AppliedSite(
                p.index,
                p.site.address,
                p.site.original,
                jump,
                layout.address,
                layout.size,
                layout.tail,
                counter,
                list(layout.copies),
                list(layout.body),
                list(p.site.starts),
            )
        )
    for s in applied_sites:
        tx.write(s.address, s.jump)
    cave.registry.patches.append(
        AppliedPatch(patch.id, patch.version, patch.info.title or "", time.time(), applied_sites)
    )
    _store(tx, cave)
    return layouts


def _layout(
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


def _prepare(pid: int, module: LoadedModule, planned: list[PlannedSite]) -> None:
    """Lay the trampolines out once before stopping, so that their bodies are assembled
    (and cached) while the process still runs; in the stop, the same layout is a cache hit."""
    with Memory(pid, writable=False) as memory:
        cave = cave_of(read_caves(memory, read_maps(pid)), module)
    if cave is not None:
        with contextlib.suppress(MicropatchError):  # the real layout will report it
            _layout(cave, planned)


def _store(tx: Transaction, cave: Cave) -> None:
    if cave.registry.patches:
        tx.write(cave.address, cave.registry.encode())


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
