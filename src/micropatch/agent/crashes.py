"""Crash auto-disable: which patches crashed too often, and what each process carried.

A patched process that dies of SIGSEGV, SIGBUS, SIGILL, SIGABRT or SIGTRAP
counts one crash against every patch it carried, for its executable. When a
(patch, executable) pair reaches ``crash_limit`` crashes within
``crash_window`` seconds, `CrashTracker.record` returns the patch id, once, and
the agent disables that patch for that executable (docs/agent.md).

The exit event arrives after the process is gone, when its registry can no
longer be read, so the agent keeps `Carried` up to date itself: what it
applied, removed, or found in a scan, per pid.

Pure bookkeeping, no kernel: the agent feeds it `process.connector` events.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import NamedTuple

from micropatch.process.connector import ExitEvent, ExitWatcher, Overrun

log = logging.getLogger(__name__)


class CrashTracker:
    """Counts crashes per (patch id, executable) in a sliding window.

    A crash at time t counts at ``now`` while ``now - t <= window``. Once a
    pair has been returned it is not returned again until `reset` (the
    operator enabled the patch again for that executable). Thread-safe.
    """

    def __init__(self, limit: int, window: float) -> None:
        if limit < 1:
            raise ValueError(f"crash_limit must be at least 1, not {limit}")
        if window <= 0:
            raise ValueError(f"crash_window must be a positive number of seconds, not {window}")
        self.limit = limit
        self.window = window
        self._crashes: dict[tuple[str, str], deque[float]] = {}
        self._tripped: set[tuple[str, str]] = set()
        self._lock = threading.Lock()

    def record(self, exe: str, patches: Iterable[str], now: float) -> list[str]:
        """A crash of a process running exe that carried these patch ids; returns the ids
        that have now reached `limit` crashes within `window` seconds for this exe."""
        reached: list[str] = []
        with self._lock:
            for patch_id in sorted(set(patches)):
                key = (patch_id, exe)
                if key in self._tripped:
                    continue
                times = self._crashes.setdefault(key, deque())
                times.append(now)
                self._expire(times, now)
                if len(times) >= self.limit:
                    self._tripped.add(key)
                    del self._crashes[key]
                    reached.append(patch_id)
        return reached

    def count(self, patch_id: str, exe: str, now: float) -> int:
        """Crashes of this pair within the window ending at now (for status)."""
        with self._lock:
            times = self._crashes.get((patch_id, exe))
            if times is None:
                return 0
            self._expire(times, now)
            return len(times)

    def reset(self, patch_id: str, exe: str | None = None) -> None:
        """Forget the crashes and the trip of a patch (for one exe or all): it was
        enabled again, and may be disabled again by new crashes."""
        with self._lock:
            for key in [*self._crashes, *self._tripped]:
                if key[0] == patch_id and (exe is None or key[1] == exe):
                    self._crashes.pop(key, None)
                    self._tripped.discard(key)

    def prune(self, now: float) -> None:
        """Drop pairs with no crash left in the window (bounds memory on a long run)."""
        with self._lock:
            for key in list(self._crashes):
                times = self._crashes[key]
                self._expire(times, now)
                if not times:
                    del self._crashes[key]

    def _expire(self, times: deque[float], now: float) -> None:
        while times and now - times[0] > self.window:
            times.popleft()


class Carrying(NamedTuple):
    """What one process carried: its executable and the patch ids applied in it.

    ``since_ns`` (CLOCK_MONOTONIC, like the connector's timestamps) is when the
    agent began to patch or scan it: an exit event older than that is of an
    earlier process that had the same pid.
    """

    exe: str
    patches: frozenset[str]
    since_ns: int


class Carried:
    """pid -> (exe, patch ids) for every patched process, kept by the agent.

    Update it whenever a patch is applied or removed and after each scan; on a
    process exit, `forget` returns what it carried. Thread-safe.
    """

    def __init__(self) -> None:
        self._by_pid: dict[int, Carrying] = {}
        self._lock = threading.Lock()

    def set(
        self, pid: int, exe: str, patches: Iterable[str], *, since_ns: int | None = None
    ) -> None:
        """The whole truth about pid (after a scan of its registry, or at exec).
        No patches: pid is forgotten. Pass ``since_ns=time.monotonic_ns()`` taken
        *before* patching or reading, so a crash right after still counts."""
        ids = frozenset(patches)
        since = time.monotonic_ns() if since_ns is None else since_ns
        with self._lock:
            if ids:
                self._by_pid[pid] = Carrying(exe, ids, since)
            else:
                self._by_pid.pop(pid, None)

    def add(self, pid: int, exe: str, patch_id: str, *, since_ns: int | None = None) -> None:
        """patch_id was applied in pid (running exe)."""
        with self._lock:
            old = self._by_pid.get(pid)
            if old is not None and old.exe == exe:
                self._by_pid[pid] = old._replace(patches=old.patches | {patch_id})
                return
            since = time.monotonic_ns() if since_ns is None else since_ns
            self._by_pid[pid] = Carrying(exe, frozenset({patch_id}), since)

    def discard(self, pid: int, patch_id: str) -> None:
        """patch_id was removed from pid."""
        with self._lock:
            old = self._by_pid.get(pid)
            if old is None:
                return
            rest = old.patches - {patch_id}
            if rest:
                self._by_pid[pid] = old._replace(patches=rest)
            else:
                del self._by_pid[pid]

    def forget(self, pid: int, *, exited_ns: int | None = None) -> Carrying | None:
        """pid exited: drop it and return what it carried. With ``exited_ns`` (the exit
        event's timestamp), an entry recorded after that exit is of a newer process
        that reused the pid: it is kept and None returned."""
        with self._lock:
            entry = self._by_pid.get(pid)
            if entry is None:
                return None
            if exited_ns is not None and exited_ns and entry.since_ns > exited_ns:
                return None
            del self._by_pid[pid]
            return entry

    def get(self, pid: int) -> Carrying | None:
        with self._lock:
            return self._by_pid.get(pid)

    def __getitem__(self, pid: int) -> Carrying:
        with self._lock:
            return self._by_pid[pid]

    def __contains__(self, pid: object) -> bool:
        with self._lock:
            return pid in self._by_pid

    def __len__(self) -> int:
        with self._lock:
            return len(self._by_pid)

    def snapshot(self) -> dict[int, Carrying]:
        with self._lock:
            return dict(self._by_pid)


@dataclass(frozen=True)
class Crash:
    """A patched process crashed: what the agent reports and counts."""

    pid: int
    exe: str
    patches: frozenset[str]
    signal: int
    core_dumped: bool


def on_exit(carried: Carried, event: ExitEvent) -> Crash | None:
    """Handle one connector exit event: forget the process; a Crash if it was a
    patched process killed by a crash signal. Thread exits are ignored."""
    if not event.process_exit:
        return None
    entry = carried.forget(event.pid, exited_ns=event.timestamp_ns)
    if entry is None or not event.crashed or event.signal is None:
        return None
    return Crash(event.pid, entry.exe, entry.patches, event.signal, event.core_dumped)


class ExitThread:
    """The agent's part that follows process exits: a thread reading the proc
    connector, calling ``on_exit(event)`` for every process exit (thread-group
    leaders only) and ``on_overrun()`` when the kernel dropped events (rescan).

    `start` subscribes in the calling thread, so a `ConnectorError` (no
    privilege, a container) reaches the agent, which can run on without crash
    auto-disable. A callback that raises is logged; the thread goes on.
    """

    def __init__(
        self,
        on_exit: Callable[[ExitEvent], None],
        on_overrun: Callable[[], None] | None = None,
    ) -> None:
        self._on_exit = on_exit
        self._on_overrun = on_overrun
        self._watcher: ExitWatcher | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._watcher = ExitWatcher(("exit",)).open()
        self._thread = threading.Thread(target=self._run, name="exits", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Unsubscribe and end the thread (idempotent)."""
        watcher, thread = self._watcher, self._thread
        self._watcher = self._thread = None
        if watcher is not None:
            watcher.close()
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def _run(self) -> None:
        watcher = self._watcher
        assert watcher is not None
        for event in watcher:
            try:
                if isinstance(event, Overrun):
                    if self._on_overrun is not None:
                        self._on_overrun()
                elif isinstance(event, ExitEvent) and event.process_exit:
                    self._on_exit(event)
            except Exception:
                log.exception("exit watcher: handling %s failed", event)
