"""Running processes: make each one carry exactly what the policy wants.

A pass looks at every process (or the ones named), `workers` at a time (threads:
while one waits for a target's threads to stop, another works): the patches of the store
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
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from micropatch import live
from micropatch.agent.covered import Carriers, Covered
from micropatch.agent.events import Event, EventSink
from micropatch.agent.known import Carried, carried_after
from micropatch.agent.policy import PolicyView, wants
from micropatch.agent.pythonpass import PythonPass
from micropatch.agent.store import ArtifactStore, PolicyState, Stored
from micropatch.agent.verified import PassVerified
from micropatch.agent.workers import in_own_thread
from micropatch.errors import (
    AlreadyApplied,
    MicropatchError,
    ModuleError,
    NotApplied,
    ProcessExited,
    ProcessNotFound,
)
from micropatch.live.lock import waiting
from micropatch.live.mapped import CAVE_PREFIX, ModuleCache, find_module
from micropatch.live.states import read_counters
from micropatch.process.maps import parse_maps
from micropatch.process.procfs import read_proc_text, start_or_none, start_time
from micropatch.process.select import ProcessInfo, all_pids, read_info

if TYPE_CHECKING:
    from micropatch.live.engine import Outcome

log = logging.getLogger(__name__)

GONE = (ProcessNotFound, ProcessExited)


@dataclass
class PassResult:
    seen: int = 0
    applied: int = 0
    updated: int = 0
    removed: int = 0
    failed: int = 0
    number: int = 0  # which pass of the agent (counted from 1 as they begin)
    # patch id -> the processes mapping its module that the policy wants to carry it,
    # and those it wants not to (what `agent ... --wait` compares the carriers with)
    wanted: dict[str, set[int]] = field(default_factory=dict)
    unwanted: dict[str, set[int]] = field(default_factory=dict)
    python: dict[str, int] = field(default_factory=dict)  # the CPython pass's counts


def alive(pid: int, start: int) -> bool:
    try:
        return start_time(pid) == start
    except MicropatchError:
        return False


class Reconciler:
    """Passes over the running processes; at most `workers` operations at once, all of
    the agent's together (`ops`, shared with the socket's operations)."""

    def __init__(
        self,
        store: ArtifactStore,
        state: PolicyState,
        report: EventSink,
        *,
        modules: ModuleCache,
        ops: threading.Semaphore,
        lock_timeout: float = 30.0,
        workers: int = 1,
    ) -> None:
        self.store = store
        self.state = state
        self.report = report
        self.modules = modules
        self.ops = ops
        self.lock_timeout = lock_timeout
        self.workers = workers
        self.carriers = Carriers(start_or_none)
        # The store's CPython patches over the host's interpreters (agent/pythonpass.py).
        self.python = PythonPass(store.python_patches, store.recheck_python, state, report,
                                 ops=ops, lock_timeout=lock_timeout)  # fmt: skip
        self._lock = threading.Lock()
        # The last failure of each (pid, patch id, version, op): the same error on the
        # next pass is retried but not reported again (one event, not one a minute).
        self._failed: dict[tuple[int, str, int | None, str], str] = {}

    # --- what the agent knows ---------------------------------------------------

    def covered(self) -> dict[int, Covered]:
        return self.carriers.all()

    def note(self, event: Event) -> None:
        """Keep `covered` true when something else (new processes, the socket) patches."""
        if event.pid is None or event.patch_id is None:
            return
        if event.data.get("runtime") == "cpython":  # `covered` before the next Python pass
            self.python.note(event.pid, event.kind, event.patch_id, event.version)
        # Either runtime: what a process carried is known at its exit, crash or not,
        # even once a pass has found it gone (buried, see covered.py).
        self.carriers.note(event.pid, event.exe or "", event.kind, event.patch_id, event.version)

    def get(self, pid: int) -> Covered | None:
        """What is known of one process (a copy), or None."""
        return self.carriers.get(pid)

    def forget(self, pid: int, exited_ns: int | None = None) -> Covered | None:
        """Forget a process (it exited): what it carried, CPython patches included."""
        native = self.carriers.forget(pid, exited_ns)
        python = self.python.forget(pid)
        if python is None or native is None:
            return native or python
        native.patches.update(python.patches)
        return native

    def gone(self, pid: int) -> None:
        """A pass or a counter read found pid gone: buried until its exit event (which
        says whether it crashed) or a grace time; its CPython patches forgotten."""
        self.carriers.bury(pid)
        self.python.forget(pid)

    def failure(self, pid: int, patch_id: str) -> str | None:
        """The last error of an operation of this patch on this process, if it failed."""
        with self._lock:
            return next((m for k, m in self._failed.items() if k[:2] == (pid, patch_id)), None)

    def forked(self, parent: int, child: int, ns: int) -> None:
        """A fork (proc connector): the child carries its parent's patches, and their
        blocked counters as they were (copies of the parent's pages): those counts
        are the parent's, not to be reported again for the child."""
        c = self.carriers.forked(parent, child, ns)
        if c is None or not c.start:
            return
        for patch_id, count in c.blocked.items():
            if count and self.state.counted(child, c.start, patch_id) is None:
                self.state.count(child, c.start, patch_id, count)

    def execed(self, pid: int, ns: int) -> None:
        """An exec (proc connector): the old image's patches are gone."""
        self.carriers.execed(pid, ns)

    # --- passes -----------------------------------------------------------------

    def run_pass(self, pids: Iterable[int] | None = None, number: int = 0) -> PassResult:
        """Reconcile every process (or those named); prune what is gone."""
        result = PassResult(number=number)
        full = pids is None
        patches = self.store.patches()
        view = self.state.view(start_or_none)
        verified = PassVerified(self.store)  # each patch's signatures: once this pass
        me = os.getpid()
        todo = [pid for pid in (all_pids() if pids is None else pids) if pid != me]
        result.seen = len(todo)

        def one(pid: int) -> None:
            try:
                self._reconcile(pid, patches, view, result, verified)
            except GONE:
                self.gone(pid)
            except MicropatchError as e:
                log.debug("process %d: %s", pid, e)
            except Exception:
                log.exception("process %d: unexpected error; the pass goes on", pid)

        # In threads that end with the pass, even one: a target thread a stop could not
        # let go is let go at their end (process/seized.py), not kept by this thread.
        if todo:
            workers = min(self.workers, len(todo))
            with ThreadPoolExecutor(workers, thread_name_prefix="reconcile") as pool:
                for _ in pool.map(one, todo):
                    pass
        if full:
            self.state.prune(alive)
            self.carriers.retain(lambda c: alive(c.pid, c.start))
            live_pids = set(all_pids())
            with self._lock:
                self._failed = {k: v for k, v in self._failed.items() if k[0] in live_pids}
        result.python = in_own_thread(lambda: self.python.run(None if full else todo))
        return result

    def poll_blocked(self) -> None:
        """Read the blocked counters of the processes known to carry patches.

        Cheap when nothing happened (the common case, every few seconds on every
        covered process): only the counters are read, at the addresses the last full
        read gave; a change, or a counter that cannot be read, takes the full read.
        The CPython patches' counters are read from the interpreters' pages."""
        self.python.poll_blocked()
        for pid, c in self.covered().items():
            if not c.patches or (c.counters is not None and not self._counters_moved(pid, c)):
                continue
            try:
                states = live.status(pid)
                if not alive(pid, c.start):
                    raise ProcessNotFound(f"process {pid} is gone")
            except GONE:
                self.gone(pid)
                continue
            except MicropatchError as e:
                log.debug("process %d: cannot read its counters: %s", pid, e)
                continue
            self._count(pid, c.start, c.exe, states)
            self.carriers.set_counters(pid, {s.patch_id: s.counters for s in states if s.counters})

    def _reconcile(
        self,
        pid: int,
        patches: dict[str, Stored],
        view: PolicyView,
        result: PassResult,
        verified: PassVerified,
    ) -> None:
        text = read_proc_text(pid, "maps")
        # Most processes map no patched module and carry nothing: one look at the raw
        # text (a name ends its line) settles it without parsing the maps.
        has_cave = CAVE_PREFIX in text
        names = {s.admitted.patch.target.module for s in patches.values()}
        if not has_cave and not any(f"/{name}\n" in text or f"/{name} (deleted)\n" in text
                                    for name in names):  # fmt: skip
            return
        mappings = parse_maps(text)
        mapped = {m.name for m in mappings if m.inode}
        named = [s for s in patches.values() if s.admitted.patch.target.module in mapped]
        if not named and not has_cave:
            return
        info = read_info(pid)
        if not info.exe:
            return
        start = start_time(pid)
        read_ns = time.monotonic_ns()  # what is read from here on is known from then
        states = live.status(pid) if has_cave else []
        if any(s.state != "applied" for s in states):
            with self.ops, waiting(self.lock_timeout):
                for line in live.repair(pid):
                    log.info("process %d: repair: %s", pid, line)
            states = live.status(pid)
        applied = {s.patch_id: s for s in states}
        if not named and not any(s.patch_id in patches for s in states):
            self._remember(pid, start, info.exe, states, read_ns)
            return
        # The patches whose module identity this process maps.
        matching: list[Stored] = []
        for stored in named:
            try:
                find_module(pid, mappings, stored.admitted.patch.target, self.modules)
            except ModuleError:
                continue  # another build of the module (or unmapped meanwhile)
            matching.append(stored)
        done: list[tuple[str, Stored, Outcome | bool]] = []
        for stored in matching:
            current = applied.get(stored.id)
            wanted = wants(stored.id, info, view)
            with self._lock:
                (result.wanted if wanted else result.unwanted).setdefault(stored.id, set()).add(pid)
            if not wanted:
                continue
            if current is None:
                op = "apply"
            elif current.version < stored.version:
                op = "update"
            else:
                continue  # carries this version already (or a newer one)
            done.append((op, stored, self._operate(op, stored, info, result, verified)))
        for patch_id, current in applied.items():
            carried = patches.get(patch_id)
            if carried is not None and not wants(patch_id, info, view):
                with self._lock:
                    result.unwanted.setdefault(patch_id, set()).add(pid)
                outcome = self._operate("remove", carried, info, result, verified, current.version)
                done.append(("remove", carried, outcome))
        now: Sequence[Carried] = states
        if any(outcome for _, _, outcome in done):  # changed: known from the outcomes
            after = carried_after(applied, done)
            now = live.status(pid) if after is None else after
        self._remember(pid, start, info.exe, now, read_ns)
        self._count(pid, start, info.exe, now)

    def _remember(
        self, pid: int, start: int, exe: str, states: Sequence[Carried], read_ns: int
    ) -> None:
        self.carriers.remember(
            pid, start, exe, {s.patch_id: s.version for s in states},
            {s.patch_id: s.counters for s in states if s.counters}, read_ns,
        )  # fmt: skip

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

    def _count(self, pid: int, start: int, exe: str, states: Sequence[Carried]) -> None:
        """Blocked counters that grew since last read become events (the delta)."""
        for s in states:
            if s.blocked is None:
                continue
            before = self.state.counted(pid, start, s.patch_id)
            self.carriers.set_blocked(pid, s.patch_id, s.blocked)
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
        verified: PassVerified,
        old_version: int | None = None,
    ) -> Outcome | bool:
        """One operation, reported as an event: its outcome if it did what was asked;
        True if the process changed meanwhile (read it again), False if nothing changed."""
        module = stored.admitted.patch.target.module
        if op != "remove":
            # Pending before the jumps are written: a process that crashes the instant
            # it is patched counts against the patch (crash auto-disable), even if it
            # dies before this thread reports the outcome.
            self.carriers.pending(info.pid, info.exe, stored.id, stored.version)
        try:
            with self.ops, waiting(self.lock_timeout):
                if op == "remove":
                    outcome = live.remove(stored.id, info.pid)
                else:
                    admitted = verified.admitted(stored.id)  # the keys trusted this pass
                    if admitted is None:  # rejected by the check, with its event
                        self.carriers.pending(info.pid, info.exe, stored.id, None)
                        return False
                    run = live.apply if op == "apply" else live.update
                    outcome = run(admitted, info.pid, modules=self.modules)
        except GONE:
            raise
        except (AlreadyApplied, NotApplied) as e:
            log.debug("process %d: %s", info.pid, e)  # changed meanwhile: next pass sees it
            return True
        except MicropatchError as e:
            self.carriers.pending(info.pid, info.exe, stored.id, None)
            key = (info.pid, stored.id, stored.version, op)
            with self._lock:
                result.failed += 1
                again = self._failed.get(key) == str(e)
                self._failed[key] = str(e)
            if again:
                log.debug("process %d: %s again: %s", info.pid, op, e)
                return False
            fields = e.fields()
            self.report(Event(
                "failed", time.time(), info.pid, info.exe, stored.id,
                old_version if op == "remove" else stored.version, module,
                f"{op} {stored.id} in pid {info.pid}: {e}", {"op": op, **fields},
            ))  # fmt: skip
            return False
        kind = {"apply": "applied", "update": "updated", "remove": "removed"}[op]
        with self._lock:
            self._failed.pop((info.pid, stored.id, stored.version, op), None)
            setattr(result, kind, getattr(result, kind) + 1)
        version = old_version if op == "remove" else stored.version
        self.report(Event(
            kind, time.time(), info.pid, info.exe, stored.id, version, module,
            f"{kind} {stored.id} v{version} in pid {info.pid} ({info.exe}); "
            f"paused {outcome.paused * 1e3:.2f} ms",
            {"sites": outcome.sites, "paused_ms": round(outcome.paused * 1e3, 3),
             "when": "running"},
        ))  # fmt: skip
        return outcome
