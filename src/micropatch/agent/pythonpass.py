"""Running CPython interpreters: make each one carry exactly the Python patches the
policy wants, as `reconcile` does for native patches.

A pass reads, without stopping anything (`runtimes.cpython.inventory`), every
interpreter of a supported version and the modules it imported with their
source's SHA-256; a stored Python patch concerns an interpreter when the module
it names is imported there from the very source it was built for (name and
SHA-256) and the interpreter is the Python version its code was compiled for.
The interpreter's page says what it carries (`runtimes.cpython.states`: the
registry is the truth, so a restarted agent neither patches twice nor forgets).
Then, with the policy (enabled, exclusions, pins, auto-disable: `agent.policy`),
it applies, updates or removes, under the agent's `ops` like its native passes, each an
event. Blocked counters that grew become "blocked" events. A module imported
after a pass is patched at the next one (`rescan_interval`, 60 s by default, or
at once on `micropatch agent rescan`/SIGHUP). One process failing never stops a
pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

from micropatch.agent.covered import Covered
from micropatch.agent.events import Event, EventSink
from micropatch.agent.policy import PolicyView, wants
from micropatch.agent.store import PolicyState
from micropatch.errors import (
    AlreadyApplied,
    ArtifactError,
    MicropatchError,
    NotApplied,
    ProcessExited,
    ProcessNotFound,
    SignatureError,
)
from micropatch.live.lock import waiting
from micropatch.process.procfs import start_or_none, start_time
from micropatch.process.select import ProcessInfo, read_info
from micropatch.runtimes.base import PatchState
from micropatch.runtimes.cpython import engine, states
from micropatch.runtimes.cpython.inventory import PythonInventory, PythonProcess
from micropatch.trust.admission import AdmittedPython

log = logging.getLogger(__name__)

GONE = (ProcessNotFound, ProcessExited)
_KIND = {"apply": "applied", "update": "updated", "remove": "removed"}


def concerns(patch: AdmittedPython, interpreter: PythonProcess) -> bool:
    """Whether `patch` is for a module `interpreter` imported, from the same source,
    and for its Python version."""
    payload = patch.artifact.payload
    source = interpreter.modules.get(payload.module.name)
    return (
        source is not None
        and source.sha256 == payload.module.sha256
        and interpreter.minor == payload.python.version
    )


class PythonPass:
    """Passes over the host's interpreters."""

    def __init__(
        self,
        patches: Callable[[], dict[str, AdmittedPython]],
        recheck: Callable[[str], AdmittedPython],
        state: PolicyState,
        report: EventSink,
        *,
        ops: threading.Semaphore,
        lock_timeout: float = 30.0,
    ) -> None:
        self.patches = patches  # the stored Python patches, by id
        self.recheck = recheck  # a stored patch, its signatures checked with today's keys
        self.state = state
        self.report = report
        self.ops = ops  # the agent's operations at once (shared with the native passes)
        self.lock_timeout = lock_timeout
        self.inventory = PythonInventory()
        self.interpreters: list[PythonProcess] = []  # as the last pass saw them
        # pid -> (start, info, {patch id: version}) of the interpreters carrying patches
        self._carrying: dict[int, tuple[int, ProcessInfo, dict[str, int]]] = {}
        self._blocked: dict[int, dict[str, int]] = {}  # pid -> patch id -> blocked, last read
        # The last failure of (pid, patch id, version, op): reported once, retried.
        self._failed: dict[tuple[int, str, int, str], str] = {}

    def run(self, pids: list[int] | None = None) -> dict[str, int]:
        """One pass; how many operations of each kind were done, and failed."""
        done = {"applied": 0, "updated": 0, "removed": 0, "failed": 0}
        patches = self.patches()
        view = self.state.view(start_or_none)
        needed = {p.artifact.payload.module.name for p in patches.values()}
        fresh = self.inventory.interpreters(pids, needed)
        if pids is None:
            self.interpreters = fresh
        else:  # a pass over some processes: the others as last seen
            named = set(pids)
            self.interpreters = [i for i in self.interpreters if i.pid not in named] + fresh
        for interpreter in fresh:
            try:
                self._reconcile(interpreter, patches, view, done)
            except GONE:
                continue
            except MicropatchError as e:
                log.debug("process %d: %s", interpreter.pid, e)
            except Exception:
                log.exception("process %d: unexpected error; the pass goes on", interpreter.pid)
        if pids is None:
            alive = {i.pid for i in self.interpreters}
            self._failed = {k: v for k, v in self._failed.items() if k[0] in alive}
            self._carrying = {p: c for p, c in self._carrying.items() if p in alive}
            self._blocked = {p: b for p, b in self._blocked.items() if p in alive}
        return done

    def poll_blocked(self) -> None:
        """Read the blocked counters of the interpreters that carry patches (a read of
        each page through /proc/PID/mem: cheap enough every `blocked_interval`)."""
        for pid, (start, info, _) in list(self._carrying.items()):
            try:
                if start_time(pid) != start:
                    raise ProcessNotFound(f"process {pid} is gone")
                self._count(start, info, states.status(pid))
            except MicropatchError:
                self._carrying.pop(pid, None)

    def covered(self, native: Iterable[Covered]) -> list[Covered]:
        """`native` (the processes the native passes cover) with the interpreters that
        carry Python patches added, one entry per process (an interpreter may carry
        native patches too)."""
        merged = {c.pid: c for c in native}
        for pid, (start, info, patches) in list(self._carrying.items()):
            known = merged.get(pid)
            carried = {**(known.patches if known else {}), **patches}
            blocked = {**(known.blocked if known else {}), **self._blocked.get(pid, {})}
            merged[pid] = Covered(pid, start, info.exe, carried, blocked)
        return list(merged.values())

    def note(self, pid: int, kind: str, patch_id: str, version: int | None) -> None:
        """An applied, updated or removed event of a CPython patch (an operator's through
        the socket, or this pass's own): `covered` says so before the next pass."""
        if kind not in _KIND.values():
            return
        try:
            start, info = start_time(pid), read_info(pid)
        except MicropatchError:
            return  # gone: nothing to cover
        known = self._carrying.get(pid)
        patches = dict(known[2]) if known is not None and known[0] == start else {}
        if kind == "removed":
            patches.pop(patch_id, None)
        elif version is not None:
            patches[patch_id] = version
        if patches:
            self._carrying[pid] = (start, info, patches)
        else:
            self._carrying.pop(pid, None)

    def forget(self, pid: int) -> Covered | None:
        """An interpreter exited: what it carried (for crash accounting), forgotten."""
        self._blocked.pop(pid, None)
        carrying = self._carrying.pop(pid, None)
        if carrying is None:
            return None
        start, info, patches = carrying
        return Covered(pid, start, info.exe, dict(patches))

    def modules(self) -> list[dict[str, object]]:
        """The Python modules of the last pass, for the check-in's inventory."""
        return self.inventory.modules(self.interpreters)

    def _reconcile(
        self,
        interpreter: PythonProcess,
        patches: dict[str, AdmittedPython],
        view: PolicyView,
        done: dict[str, int],
    ) -> None:
        pid = interpreter.pid
        carried = {s.patch_id: s for s in states.status(pid)}
        if not carried and not any(concerns(p, interpreter) for p in patches.values()):
            return
        info = read_info(pid)
        start = start_time(pid)
        for patch_id, patch in sorted(patches.items()):
            current = carried.get(patch_id)
            wanted = concerns(patch, interpreter) and wants(patch_id, info, view)
            if wanted and current is None:
                self._operate("apply", patch, info, done)
            elif wanted and current is not None and current.version < patch.version:
                self._operate("update", patch, info, done)
            elif current is not None and not wants(patch_id, info, view):
                self._operate("remove", patch, info, done, current.version)
        found = states.status(pid)
        if found:
            self._carrying[pid] = (start, info, {s.patch_id: s.version for s in found})
        else:
            self._carrying.pop(pid, None)
        self._count(start, info, found)

    def _operate(
        self,
        op: str,
        patch: AdmittedPython,
        info: ProcessInfo,
        done: dict[str, int],
        old_version: int | None = None,
    ) -> None:
        pid, module = info.pid, patch.artifact.payload.module.name
        version = old_version if op == "remove" else patch.version
        try:
            with self.ops, waiting(self.lock_timeout):
                if op == "remove":
                    outcome = engine.remove(patch.id, pid)
                else:
                    fresh = self.recheck(patch.id)  # the keys trusted now
                    outcome = (engine.apply if op == "apply" else engine.update)(fresh, pid)
        except GONE:
            raise
        except (AlreadyApplied, NotApplied) as e:
            log.debug("process %d: %s", pid, e)  # changed meanwhile: the next pass sees it
            return
        except (SignatureError, ArtifactError):
            return  # rejected by recheck, with its event
        except MicropatchError as e:
            done["failed"] += 1
            key = (pid, patch.id, patch.version, op)
            if self._failed.get(key) == str(e):
                return
            self._failed[key] = str(e)
            self.report(Event(
                "failed", time.time(), pid, info.exe, patch.id, version, module,
                f"{op} {patch.id} in pid {pid}: {e}",
                {"op": op, "runtime": "cpython", **e.fields()},
            ))  # fmt: skip
            return
        self._failed.pop((pid, patch.id, patch.version, op), None)
        kind = _KIND[op]
        done[kind] += 1
        self.report(Event(
            kind, time.time(), pid, info.exe, patch.id, version, module,
            f"{kind} {patch.id} v{version} in pid {pid} ({info.exe}); in force after "
            f"{outcome.waited * 1e3:.1f} ms, paused {outcome.paused * 1e3:.2f} ms",
            {"sites": outcome.sites, "paused_ms": round(outcome.paused * 1e3, 3),
             "runtime": "cpython", "when": "running"},
        ))  # fmt: skip

    def _count(self, start: int, info: ProcessInfo, found: list[PatchState]) -> None:
        """Blocked counters that grew since the last read become events (the delta)."""
        self._blocked[info.pid] = {s.patch_id: s.blocked for s in found if s.blocked is not None}
        for s in found:
            if s.blocked is None:
                continue
            before = self.state.counted(info.pid, start, s.patch_id)
            if before == s.blocked:
                continue
            self.state.count(info.pid, start, s.patch_id, s.blocked)
            delta = s.blocked - (before or 0)
            if delta > 0:
                self.report(Event(
                    "blocked", time.time(), info.pid, info.exe, s.patch_id, s.version, s.module,
                    f"{delta} exploit attempt{'s' if delta != 1 else ''} blocked by "
                    f"{s.patch_id} in pid {info.pid} ({s.blocked} in all)",
                    {"count": delta, "total": s.blocked, "runtime": "cpython"},
                ))  # fmt: skip
