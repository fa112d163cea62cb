"""The agent's answer to a process exit: what it carried is forgotten, and a crash
is a "crashed" event for each patch it may implicate and, at the crash limit, the
auto-disable of the patch for that executable (agent/crashes.py counts).

A part of `Agent` (service.py), which the exit watcher calls.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from micropatch.agent.events import Event
from micropatch.process.connector import CRASH_SIGNALS

if TYPE_CHECKING:
    from collections.abc import Callable

    from micropatch.agent.config import AgentConfig
    from micropatch.agent.crashes import CrashTracker
    from micropatch.agent.events import EventSink
    from micropatch.agent.reconcile import Reconciler
    from micropatch.agent.store import ArtifactStore, PolicyState


class Exits:
    """Exits and crashes of the processes the agent covers (mixed into `Agent`)."""

    # Of the Agent's
    config: AgentConfig
    store: ArtifactStore
    state: PolicyState
    report: EventSink
    reconciler: Reconciler
    crash_tracker: CrashTracker | None
    _policy_changed: Callable[..., None]

    def carried(self, pid: int) -> tuple[str | None, list[str]]:
        """The executable of process pid and the patch ids it carried when last seen
        (kept up to date by every applied/updated/removed event, and by forks and
        execs), or was being given."""
        c = self.reconciler.get(pid)
        return (c.exe, c.carried()) if c else (None, [])

    def on_exit(self, pid: int, exit_signal: int | None, exited_ns: int | None = None) -> None:
        """A process exited (the exit watcher calls this, with the event's monotonic
        time); a crash signal makes it a crash of the patches it carried."""
        c = self.reconciler.forget(pid, exited_ns)
        if exit_signal in CRASH_SIGNALS and c is not None and c.exe and c.carried():
            self.on_crash(
                pid, c.exe, int(exit_signal), c.carried(),
                versions={**c.pending, **c.patches}, parent=c.parent,
            )  # fmt: skip

    def on_crash(
        self,
        pid: int,
        exe: str,
        sig: int,
        patches: Iterable[str],
        *,
        versions: dict[str, int] | None = None,
        parent: int | None = None,
    ) -> None:
        """A patched process died of a crash signal: a "crashed" event for each patch
        it carried (each may be the cause), and, through the crash tracker,
        auto-disable for (patch, exe) at the limit. `parent`: the patched process
        it was forked from (its patches inherited)."""
        patches = sorted(patches)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        forked = f", forked from pid {parent}" if parent is not None else ""
        data: dict[str, object] = {"signal": sig, "patches": patches}
        if parent is not None:
            data["parent"] = parent
        for patch_id in patches:
            stored = self.store.get(patch_id)
            self.report(Event(
                "crashed", time.time(), pid, exe, patch_id, (versions or {}).get(patch_id),
                stored.admitted.patch.target.module if stored else None,
                f"pid {pid} ({exe}{forked}) died of {name} carrying {', '.join(patches)}",
                data,
            ))  # fmt: skip
        if self.crash_tracker is None:
            return
        for patch_id in self.crash_tracker.record(exe, patches, time.time()):
            self.auto_disable(
                patch_id, exe,
                f"{self.config.crash_limit} crashes within {self.config.crash_window:g} s",
            )  # fmt: skip

    def auto_disable(self, patch_id: str, exe: str, reason: str) -> None:
        """Disable a patch for one executable, live, with a "disabled" event."""
        if not self.state.auto_disable(patch_id, exe, reason):
            return
        stored = self.store.get(patch_id)
        self.report(Event(
            "disabled", time.time(), exe=exe, patch_id=patch_id,
            version=stored.version if stored else None,
            message=f"{patch_id} auto-disabled for {exe}: {reason}",
            data={"auto": True, "reason": reason},
        ))  # fmt: skip
        self._policy_changed()
