"""The agent's requests (the control socket's verbs, and the fleet's path into the
store): status, add / update, keep and drop an artifact, enable / disable, exclude,
enroll. Each change of the policy or the store reconciles live (`_policy_changed`).

A part of `Agent` (service.py).
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from micropatch.agent.coverage import coverage
from micropatch.agent.events import Event, EventFilter
from micropatch.agent.manual import carried
from micropatch.agent.policy import DISABLED, ENABLED, exclusion, reasons_against
from micropatch.agent.store import AnyStored
from micropatch.errors import AgentError, UnknownPatch
from micropatch.process.procfs import start_or_none
from micropatch.process.select import ProcessInfo

if TYPE_CHECKING:
    import threading

    from micropatch.agent.config import AgentConfig
    from micropatch.agent.crashes import CrashTracker
    from micropatch.agent.events import EventLog, EventSink
    from micropatch.agent.fleet import Fleet
    from micropatch.agent.paths import AgentPaths
    from micropatch.agent.policy import PolicyView
    from micropatch.agent.reconcile import Reconciler
    from micropatch.agent.store import ArtifactStore, PolicyState


class Requests:
    """What the agent is asked (mixed into `Agent`)."""

    # Of the Agent's
    config: AgentConfig
    paths: AgentPaths
    store: ArtifactStore
    state: PolicyState
    events: EventLog
    report: EventSink
    reconciler: Reconciler
    crash_tracker: CrashTracker | None
    fleet: Fleet
    new_processes: Any
    ready: threading.Event
    started: float
    generation: int
    passes: int
    view: Callable[[], PolicyView]
    _policy_changed: Callable[..., None]

    def snapshot(self) -> dict[str, Any]:
        """`agent status`: patches, their state, processes covered, blocked counts."""
        view = self.view()
        # Pins are read now: an operator's apply or remove writes one without a change of
        # the policy (the cached view keeps what was pinned before).
        pinned = self.state.view(start_or_none)
        stored_patches = self.store.patches()
        # Processes that carry a patch of the store (others may carry patches applied by hand).
        everyone = self.reconciler.covered()
        covered = {
            pid: c for pid, c in everyone.items()
            if any(patch_id in stored_patches for patch_id in c.patches)
        }  # fmt: skip
        auto = self.state.auto_disabled()
        new = self.new_processes
        patches = []
        for stored in sorted(stored_patches.values(), key=lambda s: s.id):
            carriers = [c for c in covered.values() if stored.id in c.patches]
            patches.append({
                **coverage(stored, new, view.enabled(stored.id)),
                "carriers": sorted(c.pid for c in carriers),
                "id": stored.id, "version": stored.version,
                "title": stored.admitted.patch.info.title,
                "module": stored.admitted.patch.target.module,
                "state": view.states.get(stored.id, self.config.default_state),
                "file": stored.path.name,
                "processes": len(carriers),
                "blocked": sum(c.blocked.get(stored.id, 0) for c in carriers),
                "auto_disabled": [{"exe": e, "since": t, "reason": r}
                                  for p, e, t, r in auto if p == stored.id],
                "pins": _pins(pinned, stored.id),
            })  # fmt: skip
        # Patches applied by the operator that the store does not hold: listed, never hidden.
        # (The interpreters the Python pass saw carrying CPython patches among them.)
        everything = self.reconciler.python.covered(everyone.values())
        manual = carried(everything, {*stored_patches, *self.store.python_patches()})
        # The interpreters carrying the store's CPython patches (agent/pythonpass.py) too.
        covered = {c.pid: c for c in self.reconciler.python.covered(covered.values())}
        for patch_id, admitted in sorted(self.store.python_patches().items()):
            carriers = [c for c in covered.values() if patch_id in c.patches]
            patches.append({
                "copies": None, "warning": None, "carriers": sorted(c.pid for c in carriers),
                "id": patch_id, "version": admitted.version, "runtime": "cpython",
                "title": admitted.patch.info.title, "module": admitted.patch.target.module,
                "state": view.states.get(patch_id, self.config.default_state),
                "file": admitted.artifact.file_name, "processes": len(carriers),
                "blocked": sum(c.blocked.get(patch_id, 0) for c in carriers),
                "auto_disabled": [{"exe": e, "since": t, "reason": r}
                                  for p, e, t, r in auto if p == patch_id],
                "pins": _pins(pinned, patch_id),
            })  # fmt: skip
        return {
            "ready": self.ready.is_set(),
            "pid": os.getpid(),
            "started": self.started,
            "generation": self.generation,
            "passes": self.passes,
            "default_state": self.config.default_state,
            "state_dir": str(self.paths.state_dir),
            "trust_dir": str(self.paths.trust_dir),
            "patches": patches,
            "manual": manual,
            "exclusions": [asdict(e) for e in view.exclusions],
            "processes": [
                {"pid": c.pid, "exe": c.exe, "patches": c.patches, "blocked": c.blocked}
                for c in sorted(covered.values(), key=lambda c: c.pid)
            ],
            "new_processes": new.status() if new is not None else None,
            "fleet": self.fleet.status(),
        }

    def add(
        self, data: bytes, name: str, state: str | None = None, *, update: bool = False
    ) -> dict[str, Any]:
        """`agent add`: admit, store, set the state (default_state for a new patch),
        reconcile live (a newer version updates the processes that carry the old).
        `update` (`agent update`): only a newer version of a stored patch."""
        if update:
            admitted = self.store.admit_any_bytes(data, name)
            older = self._stored(admitted.id)
            if older.version >= admitted.version:
                raise AgentError(
                    f"{name} is {admitted.id} version {admitted.version}; the store holds "
                    f"version {older.version} already: an update needs a newer version",
                    patch_id=admitted.id,
                )
        stored, replaced, current = self.keep(data, name, state, lambda s: f"added {s.path.name}")
        self._policy_changed()
        return {
            "id": stored.id, "version": stored.version, "state": current,
            "file": stored.path.name, "replaced": replaced.version if replaced else None,
            "warnings": list(stored.admitted.warnings),
        }  # fmt: skip

    def keep(
        self,
        data: bytes,
        name: str,
        state: str | None,
        what: Callable[[AnyStored], str],
        details: dict[str, Any] | None = None,
    ) -> tuple[AnyStored, AnyStored | None, str]:
        """Admit and store an artifact, set its state (None: keep it, default_state for
        a new patch) and say so in an event (`what` names how it came); returns it, the
        version it replaced, its state. The caller reconciles (`_policy_changed`)."""
        stored, replaced = self.store.add(data, name)
        if state is not None:
            self.state.set_state(stored.id, state)
        current = self.state.ensure(stored.id, self.config.default_state)
        self.report(Event(
            "agent", time.time(), patch_id=stored.id, version=stored.version,
            module=stored.admitted.patch.target.module,
            message=f"{what(stored)} ({current})"
            + (f", replacing version {replaced.version}" if replaced else ""),
            data=details or {},
        ))  # fmt: skip
        return stored, replaced, current

    def drop(self, patch_id: str, why: str) -> None:
        """Take a patch out of the store (a revocation), with an event; the processes
        no longer carry it (it was disabled and reconciled first)."""
        stored = self.store.drop(patch_id, why)
        if stored is None:
            return
        self.report(Event(
            "agent", time.time(), patch_id=patch_id, version=stored.version,
            message=f"{stored.path.name} dropped from the store: {why}",
        ))  # fmt: skip
        self._policy_changed()

    def enroll(self, url: str, token: str, root: str | None) -> dict[str, Any]:
        """`agent enroll`: this host's credential from a one-time token (agent/fleet/)."""
        return self.fleet.enroll(url, token, root)

    def set_enabled(self, patch_id: str, enabled: bool) -> dict[str, Any]:
        stored = self._stored(patch_id)
        state = ENABLED if enabled else DISABLED
        self.state.set_state(patch_id, state)
        if enabled and self.crash_tracker is not None:
            self.crash_tracker.reset(patch_id)  # a fresh start: old crashes no longer count
        self.report(Event(
            "agent" if enabled else "disabled", time.time(), patch_id=patch_id,
            version=stored.version, message=f"{patch_id} {state} by the operator",
        ))  # fmt: skip
        self._policy_changed()
        return {"id": patch_id, "state": state}

    def exclude(self, kind: str, value: str, patch_id: str | None, remove: bool) -> dict[str, Any]:
        if patch_id:
            self._stored(patch_id)
        e = exclusion(kind, value, patch_id)
        done = self.state.unexclude(e) if remove else self.state.exclude(e)
        if not done:
            raise AgentError(
                f"no exclusion {e.describe()}" if remove else f"already excluded: {e.describe()}"
            )
        self.report(Event(
            "agent", time.time(), patch_id=patch_id,
            message=f"{'removed exclusion' if remove else 'excluded'} {e.describe()}",
            data={"kind": e.kind, "pattern": e.pattern},
        ))  # fmt: skip
        self._policy_changed()
        return {"exclusion": asdict(e), "removed": remove}

    def _stored(self, patch_id: str) -> AnyStored:
        stored = self.store.get(patch_id)
        if stored is None:
            ids = [*self.store.patches(), *self.store.python_patches()]
            known = ", ".join(sorted(ids)) or "none"
            raise UnknownPatch(
                f"no patch {patch_id} in the agent's store (known: {known}); "
                "add it with `micropatch agent add ARTIFACT.mpatch`",
                patch_id=patch_id,
            )
        return stored

    def why(self, info: ProcessInfo, patch_id: str) -> list[str]:
        """Why a patch is not on a process (for messages)."""
        return reasons_against(patch_id, info, self.view())

    def events_since(self, filt: EventFilter, limit: int | None) -> list[Event]:
        return self.events.query(filt, limit)

    def decode_artifact(self, args: dict[str, Any]) -> tuple[bytes, str]:
        try:
            data = base64.b64decode(args["artifact"], validate=True)
            return data, str(args.get("name", "<artifact>"))
        except (KeyError, ValueError, TypeError) as e:
            raise AgentError(f"bad request: artifact must be base64 bytes ({e})") from None


def _pins(view: PolicyView, patch_id: str) -> list[dict[str, Any]]:
    """The processes an operator's `micropatch apply|remove --pid` pinned this patch on
    (`wanted`) or off: they keep it so whatever its state."""
    return [
        {"pid": pid, "wanted": wanted}
        for (pinned, pid), wanted in sorted(view.pins.items())
        if pinned == patch_id
    ]
