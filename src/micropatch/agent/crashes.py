"""Crash auto-disable: which patches crashed too often, and what each process carried.

A patched process that dies of SIGSEGV, SIGBUS, SIGILL, SIGABRT or SIGTRAP
counts one crash against every patch it carried, for its executable. When a
(patch, executable) pair reaches ``crash_limit`` crashes within
``crash_window`` seconds, `CrashTracker.record` returns the patch id, once, and
the agent disables that patch for that executable (docs/agent.md).

The exit event arrives after the process is gone, when its registry can no
longer be read, so the agent keeps what each process carries itself
(agent/covered.py), from its passes and operations and from the proc
connector's fork and exec events, which `ExitThread` reads along with the
exits: a worker forked from a patched master carries the master's patches.

`CrashTracker` is pure bookkeeping, no kernel.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable

from micropatch.process.connector import (
    ConnectorError,
    ExecEvent,
    ExitEvent,
    ExitWatcher,
    ForkEvent,
    Overrun,
)

log = logging.getLogger(__name__)

INITIAL_NAMESPACES = {"pid": 0xEFFFFFFC, "user": 0xEFFFFFFD}  # kind -> inode on the host


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


class ExitThread:
    """The agent's part that follows processes: a thread reading the proc connector,
    calling ``on_exit(event)`` for every process exit (thread-group leaders only),
    ``on_fork(event)`` for every new process (not thread) and ``on_exec(event)`` for
    every exec, when given, and ``on_overrun()`` when the kernel dropped events
    (rescan).

    `start` subscribes in the calling thread, so a `ConnectorError` (no
    privilege, a container) reaches the agent, which can run on without crash
    auto-disable. A callback that raises is logged; the thread goes on.
    """

    def __init__(
        self,
        on_exit: Callable[[ExitEvent], None],
        on_overrun: Callable[[], None] | None = None,
        *,
        on_fork: Callable[[ForkEvent], None] | None = None,
        on_exec: Callable[[ExecEvent], None] | None = None,
    ) -> None:
        self._on_exit = on_exit
        self._on_overrun = on_overrun
        self._on_fork = on_fork
        self._on_exec = on_exec
        self._watcher: ExitWatcher | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        own = own_namespace()
        if own is not None:
            # The kernel ignores such a listener without an error: said now, not after
            # the connector's acknowledgement timeout (2 s of every start).
            raise ConnectorError(
                "the proc connector serves only listeners in the host's initial user and "
                f"PID namespaces, and this agent runs in a {own} namespace of its own (a "
                "container's): run the agent on the host to follow crashes"
            )
        kinds = ["exit"] + ["fork"] * bool(self._on_fork) + ["exec"] * bool(self._on_exec)
        self._watcher = ExitWatcher(kinds).open()
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
                if isinstance(event, ExitEvent):
                    if event.process_exit:
                        self._on_exit(event)
                elif isinstance(event, ForkEvent):
                    # A new process, not a thread (whose child_pid is not its tgid).
                    if self._on_fork is not None and event.child_pid == event.child_tgid:
                        self._on_fork(event)
                elif isinstance(event, ExecEvent):
                    if self._on_exec is not None:
                        self._on_exec(event)
                elif isinstance(event, Overrun) and self._on_overrun is not None:
                    self._on_overrun()
            except Exception:
                log.exception("exit watcher: handling %s failed", event)


def own_namespace() -> str | None:
    """ "pid" or "user" if this process runs in such a namespace of its own, not the
    host's initial one (whose inode numbers are fixed: PROC_PID_INIT_INO,
    PROC_USER_INIT_INO in linux/proc_ns.h); None if in both initial ones, or unknown."""
    import os

    for kind, inode in INITIAL_NAMESPACES.items():
        try:
            if os.stat(f"/proc/self/ns/{kind}").st_ino != inode:
                return kind
        except OSError:
            continue
    return None
