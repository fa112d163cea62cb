"""Running processes: make each one carry exactly what the policy wants.

A pass looks at every process (or the ones named): the patches of the store
whose module it maps (identity read from the process, `live.mapped.find_module`),
the patches its registry says it carries (`live.states.status`: the registries
are the truth, so a restarted agent neither patches twice nor forgets), and the
policy; then applies, updates or removes. Blocked counters read from the caves
become "blocked" events when they grow. One process failing never stops a pass.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from micropatch import live
from micropatch.agent.events import Event, EventSink
from micropatch.agent.policy import PolicyView, wants
from micropatch.agent.store import ArtifactStore, PolicyState, Stored
from micropatch.errors import (
    AlreadyApplied,
    ArtifactError,
    MicropatchError,
    ModuleError,
    NotApplied,
    ProcessExited,
    ProcessNotFound,
    SignatureError,
)
from micropatch.live.lock import waiting
from micropatch.live.mapped import CAVE_PREFIX, ModuleCache, find_module, module_groups
from micropatch.live.states import PatchState, read_counters
from micropatch.process.maps import read_maps
from micropatch.process.procfs import start_time
from micropatch.process.select import ProcessInfo, all_pids, read_info

log = logging.getLogger(__name__)

GONE = (ProcessNotFound, ProcessExited)


@dataclass
class Covered:
    """What the agent last saw of a process that carries (or should carry) patches."""

    pid: int
    start: int
    exe: str
    patches: dict[str, int] = field(default_factory=dict)  # patch id -> version applied
    blocked: dict[str, int] = field(default_factory=dict)  # patch id -> blocked count
    # patch id -> addresses of its blocked counters; None: not read since the last change
    counters: dict[str, tuple[int, ...]] | None = None
    # patch id -> version being applied now: not yet `patches` (status), but a crash
    # in the meantime counts against it (crash auto-disable)
    pending: dict[str, int] = field(default_factory=dict)

    def copy(self) -> Covered:
        counters = None if self.counters is None else dict(self.counters)
        return Covered(
            self.pid,
            self.start,
            self.exe,
            dict(self.patches),
            dict(self.blocked),
            counters,
            dict(self.pending),
        )


@dataclass
class PassResult:
    seen: int = 0
    applied: int = 0
    updated: int = 0
    removed: int = 0
    failed: int = 0


def alive(pid: int, start: int) -> bool:
    try:
        return start_time(pid) == start
    except MicropatchError:
        return False


def _start_or_none(pid: int) -> int | None:
    try:
        return start_time(pid)
    except MicropatchError:
        return None


class Reconciler:
    """Passes over the running processes, one operation at a time (`ops_lock`)."""

    def __init__(
        self,
        store: ArtifactStore,
        state: PolicyState,
        report: EventSink,
        *,
        modules: ModuleCache,
        ops_lock: threading.RLock,
        lock_timeout: float = 30.0,
    ) -> None:
        self.store = store
        self.state = state
        self.report = report
        self.modules = modules
        self.ops_lock = ops_lock
        self.lock_timeout = lock_timeout
        self._covered: dict[int, Covered] = {}
        self._lock = threading.Lock()
        # The last failure of each (pid, patch id, version, op): the same error on the
        # next pass is retried but not reported again (one event, not one a minute).
        self._failed: dict[tuple[int, str, int | None, str], str] = {}

    # --- what the agent knows ---------------------------------------------------

    def covered(self) -> dict[int, Covered]:
        with self._lock:
            return {pid: c.copy() for pid, c in self._covered.items()}

    def note(self, event: Event) -> None:
        """Keep `covered` true when something else (new processes, the socket) patches."""
        if event.pid is None or event.patch_id is None:
            return
        with self._lock:
            c = self._covered.get(event.pid)
            if event.kind in ("applied", "updated") and event.version is not None:
                if c is None:
                    start = _start_or_none(event.pid)
                    if start is None:
                        return
                    c = self._covered[event.pid] = Covered(event.pid, start, event.exe or "")
                c.patches[event.patch_id] = event.version
                c.pending.pop(event.patch_id, None)
                c.counters = None
            elif event.kind == "removed" and c is not None:
                c.patches.pop(event.patch_id, None)
                c.blocked.pop(event.patch_id, None)
                c.counters = None

    def _pending(self, pid: int, exe: str, patch_id: str, version: int | None) -> None:
        """Record that this version of a patch is being applied to pid (None: no more)."""
        with self._lock:
            c = self._covered.get(pid)
            if c is None:
                if version is None:
                    return
                start = _start_or_none(pid)
                if start is None:
                    return
                c = self._covered[pid] = Covered(pid, start, exe)
            if version is None:
                c.pending.pop(patch_id, None)
            else:
                c.pending[patch_id] = version

    def get(self, pid: int) -> Covered | None:
        """What is known of one process (a copy), or None."""
        with self._lock:
            c = self._covered.get(pid)
            return c.copy() if c else None

    def forget(self, pid: int) -> Covered | None:
        with self._lock:
            return self._covered.pop(pid, None)

    # --- passes -----------------------------------------------------------------

    def run_pass(self, pids: Iterable[int] | None = None) -> PassResult:
        """Reconcile every process (or those named); prune what is gone."""
        result = PassResult()
        full = pids is None
        patches = self.store.patches()
        view = self.state.view(_start_or_none)
        me = os.getpid()
        for pid in all_pids() if pids is None else pids:
            if pid == me:
                continue
            result.seen += 1
            try:
                self._reconcile(pid, patches, view, result)
            except GONE:
                self.forget(pid)
            except MicropatchError as e:
                log.debug("process %d: %s", pid, e)
            except Exception:
                log.exception("process %d: unexpected error; the pass goes on", pid)
        if full:
            self.state.prune(alive)
            with self._lock:
                for pid, c in list(self._covered.items()):
                    if not alive(pid, c.start):
                        del self._covered[pid]
                live_pids = set(all_pids())
                self._failed = {k: v for k, v in self._failed.items() if k[0] in live_pids}
        return result

    def poll_blocked(self) -> None:
        """Read the blocked counters of the processes known to carry patches.

        Cheap when nothing happened (the common case, every few seconds on every
        covered process): only the counters are read, at the addresses the last full
        read gave; a change, or a counter that cannot be read, takes the full read."""
        for pid, c in self.covered().items():
            if not c.patches or (c.counters is not None and not self._counters_moved(pid, c)):
                continue
            try:
                states = live.status(pid)
                if not alive(pid, c.start):
                    raise ProcessNotFound(f"process {pid} is gone")
            except GONE:
                self.forget(pid)
                continue
            except MicropatchError as e:
                log.debug("process %d: cannot read its counters: %s", pid, e)
                continue
            self._count(pid, c.start, c.exe, states)
            with self._lock:
                known = self._covered.get(pid)
                if known is not None:
                    known.counters = {s.patch_id: s.counters for s in states if s.counters}

    def _reconcile(
        self, pid: int, patches: dict[str, Stored], view: PolicyView, result: PassResult
    ) -> None:
        mappings = read_maps(pid)
        has_cave = any(m.path.startswith(CAVE_PREFIX) for m in mappings)
        named = [
            s for s in patches.values()
            if module_groups(mappings, s.admitted.patch.target.module)
        ]  # fmt: skip
        if not named and not has_cave:
            return
        info = read_info(pid)
        if not info.exe:
            return
        start = start_time(pid)
        states = live.status(pid) if has_cave else []
        if any(s.state != "applied" for s in states):
            with self.ops_lock, waiting(self.lock_timeout):
                for line in live.repair(pid):
                    log.info("process %d: repair: %s", pid, line)
            states = live.status(pid)
        applied = {s.patch_id: s for s in states}
        if not named and not any(s.patch_id in patches for s in states):
            self._remember(pid, start, info.exe, states)
            return
        # The patches whose module identity this process maps.
        matching: list[Stored] = []
        for stored in named:
            try:
                find_module(pid, mappings, stored.admitted.patch.target, self.modules)
            except ModuleError:
                continue  # another build of the module (or unmapped meanwhile)
            matching.append(stored)
        touched = False
        for stored in matching:
            current = applied.get(stored.id)
            if wants(stored.id, info, view):
                if current is None:
                    touched |= self._operate("apply", stored, info, result)
                elif current.version < stored.version:
                    touched |= self._operate("update", stored, info, result)
        for patch_id, current in applied.items():
            carried = patches.get(patch_id)
            if carried is not None and not wants(patch_id, info, view):
                touched |= self._operate("remove", carried, info, result, current.version)
        if touched:
            states = live.status(pid)
        self._remember(pid, start, info.exe, states)
        self._count(pid, start, info.exe, states)

    def _remember(self, pid: int, start: int, exe: str, states: list[PatchState]) -> None:
        with self._lock:
            if not states:
                self._covered.pop(pid, None)
                return
            c = self._covered.get(pid)
            if c is None or c.start != start:
                c = self._covered[pid] = Covered(pid, start, exe)
            c.patches = {s.patch_id: s.version for s in states}
            c.counters = {s.patch_id: s.counters for s in states if s.counters}

    @staticmethod
    def _counters_moved(pid: int, c: Covered) -> bool:
        """True if a counter differs from what was last counted (or cannot be read)."""
        try:
            return any(
                read_counters(pid, addresses) != c.blocked.get(patch_id)
                for patch_id, addresses in (c.counters or {}).items()
            )
        except MicropatchError:
            return True

    def _count(self, pid: int, start: int, exe: str, states: list[PatchState]) -> None:
        """Blocked counters that grew since last read become events (the delta)."""
        for s in states:
            if s.blocked is None:
                continue
            before = self.state.counted(pid, start, s.patch_id)
            with self._lock:
                c = self._covered.get(pid)
                if c is not None:
                    c.blocked[s.patch_id] = s.blocked
            if before == s.blocked:
                continue
            self.state.count(pid, start, s.patch_id, s.blocked)
            delta = s.blocked - (before or 0)
            if delta > 0:
                self.report(Event(
                    "blocked", time.time(), pid, exe, s.patch_id, s.version, s.module,
                    f"{delta} exploit attempt{'s' if delta != 1 else ''} blocked by "
                    f"{s.patch_id} in pid {pid} ({s.blocked} in all)",
                    {"count": delta, "total": s.blocked},
                ))  # fmt: skip

    def _operate(
        self,
        op: str,
        stored: Stored,
        info: ProcessInfo,
        result: PassResult,
        old_version: int | None = None,
    ) -> bool:
        """One operation, reported as an event; whether it changed the process."""
        module = stored.admitted.patch.target.module
        if op != "remove":
            # Pending before the jumps are written: a process that crashes the instant
            # it is patched counts against the patch (crash auto-disable), even if it
            # dies before this thread reports the outcome.
            self._pending(info.pid, info.exe, stored.id, stored.version)
        try:
            with self.ops_lock, waiting(self.lock_timeout):
                if op == "remove":
                    outcome = live.remove(stored.id, info.pid)
                else:
                    admitted = self.store.recheck(stored.id)  # the keys trusted now
                    run = live.apply if op == "apply" else live.update
                    outcome = run(admitted, info.pid, modules=self.modules)
        except GONE:
            raise
        except (AlreadyApplied, NotApplied) as e:
            log.debug("process %d: %s", info.pid, e)  # changed meanwhile: next pass sees it
            return True
        except (SignatureError, ArtifactError):
            self._pending(info.pid, info.exe, stored.id, None)
            return False  # rejected by recheck, with its event
        except MicropatchError as e:
            self._pending(info.pid, info.exe, stored.id, None)
            result.failed += 1
            key = (info.pid, stored.id, stored.version, op)
            if self._failed.get(key) == str(e):
                log.debug("process %d: %s again: %s", info.pid, op, e)
                return False
            self._failed[key] = str(e)
            fields = e.fields()
            self.report(Event(
                "failed", time.time(), info.pid, info.exe, stored.id,
                old_version if op == "remove" else stored.version, module,
                f"{op} {stored.id} in pid {info.pid}: {e}", {"op": op, **fields},
            ))  # fmt: skip
            return False
        self._failed.pop((info.pid, stored.id, stored.version, op), None)
        kind = {"apply": "applied", "update": "updated", "remove": "removed"}[op]
        setattr(result, kind, getattr(result, kind) + 1)
        version = old_version if op == "remove" else stored.version
        self.report(Event(
            kind, time.time(), info.pid, info.exe, stored.id, version, module,
            f"{kind} {stored.id} v{version} in pid {info.pid} ({info.exe}); "
            f"paused {outcome.paused * 1e3:.2f} ms",
            {"sites": outcome.sites, "paused_ms": round(outcome.paused * 1e3, 3),
             "when": "running"},
        ))  # fmt: skip
        return True
