"""What the agent knows each process carries, kept up to date between passes.

The processes' registries are the truth, but a crash is reported after the
process is gone, when its registry can no longer be read: the agent must
already know what it carried. `Carriers` is that knowledge, per pid, fed by

- every pass over a process (`remember`: what its registry said),
- every operation's outcome (`note`: an applied, updated or removed event,
  the agent's own, the socket's or new processes'), and what is being applied
  (`pending`: a crash during the apply still counts),
- the proc connector's fork and exec events: a process forked from a patched
  one carries its parent's patches (the pages are copied: nginx workers from a
  patched master), and an exec replaces the image, patches and all.

Every patch a process is known to carry has a time (CLOCK_MONOTONIC
nanoseconds, the connector's clock) from which it is known: an exec or exit
event older than that is about an earlier image, or an earlier process that
had the same pid, and does not touch it.

A process that a pass or a counter read finds gone is *buried*, not dropped:
its exit event, which carries the signal that killed it, may still be on its
way, and a crash is counted only from that event. A buried entry is no longer
listed as covered; it is dropped by its exit event, or `EXIT_GRACE_NS` later
(no proc connector, or its event lost).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# How long a process found gone waits for its exit event before it is forgotten.
EXIT_GRACE_NS = 30 * 10**9


@dataclass
class Covered:
    """What the agent last saw of a process that carries (or should carry) patches."""

    pid: int
    start: int  # /proc/PID/stat start time; 0: the process was gone before it was read
    exe: str
    patches: dict[str, int] = field(default_factory=dict)  # patch id -> version applied
    blocked: dict[str, int] = field(default_factory=dict)  # patch id -> blocked count
    # patch id -> addresses of its blocked counters; None: not read since the last change
    counters: dict[str, tuple[int, ...]] | None = None
    # patch id -> version being applied now: not yet `patches` (status), but a crash
    # in the meantime counts against it (crash auto-disable)
    pending: dict[str, int] = field(default_factory=dict)
    # patch id (of patches or pending) -> monotonic ns from which it is known carried
    since: dict[str, int] = field(default_factory=dict)
    parent: int | None = None  # the patched process it was forked from, if that is how
    buried: int | None = None  # monotonic ns at which it was found gone (see above)

    def copy(self) -> Covered:
        counters = None if self.counters is None else dict(self.counters)
        return Covered(
            self.pid, self.start, self.exe, dict(self.patches), dict(self.blocked), counters,
            dict(self.pending), dict(self.since), self.parent, self.buried,
        )  # fmt: skip

    def carried(self) -> list[str]:
        """The patch ids it carries or is being given, sorted."""
        return sorted({*self.patches, *self.pending})

    def _drop_before(self, ns: int) -> None:
        """Forget what was known only before `ns` (an exec then replaced the image)."""
        for patch_id in [p for p, t in self.since.items() if t < ns]:
            self.patches.pop(patch_id, None)
            self.pending.pop(patch_id, None)
            self.blocked.pop(patch_id, None)
            del self.since[patch_id]
        self.counters = None


class Carriers:
    """pid -> Covered, thread-safe. `start_of(pid)` reads a process's start time
    (None if it is gone): injected, so the bookkeeping is testable without /proc."""

    def __init__(self, start_of: Callable[[int], int | None]) -> None:
        self._start_of = start_of
        self._by_pid: dict[int, Covered] = {}
        self._lock = threading.Lock()

    # --- reading ----------------------------------------------------------------

    def all(self) -> dict[int, Covered]:
        """The processes covered (those found gone are not)."""
        with self._lock:
            return {pid: c.copy() for pid, c in self._by_pid.items() if c.buried is None}

    def get(self, pid: int) -> Covered | None:
        """What is known of pid, buried or not (its exit event reads it)."""
        with self._lock:
            c = self._by_pid.get(pid)
            return c.copy() if c else None

    def _living(self, pid: int) -> Covered | None:
        """pid's entry, unless it is of a process found gone (the pid is reused)."""
        c = self._by_pid.get(pid)
        if c is not None and c.buried is not None:
            del self._by_pid[pid]
            return None
        return c

    # --- what the agent did or read -----------------------------------------------

    def note(self, pid: int, exe: str, kind: str, patch_id: str, version: int | None) -> None:
        """An applied, updated or removed event (whoever did it)."""
        now = time.monotonic_ns()
        with self._lock:
            c = self._living(pid)
            if kind in ("applied", "updated") and version is not None:
                if c is None:
                    start = self._start_of(pid)
                    if start is None:
                        return
                    c = self._by_pid[pid] = Covered(pid, start, exe)
                if exe:
                    c.exe = exe  # at exec: the new image's
                c.patches[patch_id] = version
                c.pending.pop(patch_id, None)
                c.since[patch_id] = now
                c.counters = None
            elif kind == "removed" and c is not None:
                c.patches.pop(patch_id, None)
                c.blocked.pop(patch_id, None)
                c.since.pop(patch_id, None)
                c.counters = None

    def pending(self, pid: int, exe: str, patch_id: str, version: int | None) -> None:
        """This version of a patch is being applied to pid (None: no longer)."""
        with self._lock:
            c = self._living(pid)
            if c is None:
                if version is None:
                    return
                start = self._start_of(pid)
                if start is None:
                    return
                c = self._by_pid[pid] = Covered(pid, start, exe)
            if version is None:
                c.pending.pop(patch_id, None)
                if patch_id not in c.patches:
                    c.since.pop(patch_id, None)
            else:
                c.pending[patch_id] = version
                c.since.setdefault(patch_id, time.monotonic_ns())

    def remember(
        self, pid: int, start: int, exe: str, patches: dict[str, int],
        counters: dict[str, tuple[int, ...]], read_ns: int,
    ) -> None:  # fmt: skip
        """What pid's registries said, read from `read_ns` on: the whole truth about
        the patches it carries (what is pending stays pending)."""
        with self._lock:
            c = self._living(pid)
            if not patches and (c is None or not c.pending):
                self._by_pid.pop(pid, None)
                return
            if c is None or c.start != start:
                c = self._by_pid[pid] = Covered(pid, start, exe)
            c.exe = exe
            c.patches = dict(patches)
            c.counters = dict(counters)
            c.since = {p: t for p, t in c.since.items() if p in c.pending and p not in patches}
            c.since.update(dict.fromkeys(patches, read_ns))

    def set_blocked(self, pid: int, patch_id: str, count: int) -> None:
        with self._lock:
            c = self._by_pid.get(pid)
            if c is not None:
                c.blocked[patch_id] = count

    def set_counters(self, pid: int, counters: dict[str, tuple[int, ...]]) -> None:
        with self._lock:
            c = self._by_pid.get(pid)
            if c is not None:
                c.counters = counters

    # --- what the kernel said (proc connector) ------------------------------------

    def forked(self, parent: int, child: int, ns: int) -> Covered | None:
        """Process `parent` forked `child` at `ns`: the child carries what its parent
        did (its pages are copies). Returns the child's entry, or None if the parent
        carried nothing."""
        with self._lock:
            p = self._by_pid.get(parent)
            inherited = {k for k, t in p.since.items() if t <= ns} if p is not None else set()
            if p is None or not inherited:
                return None
            known = self._by_pid.get(child)
            if known is not None and known.since and min(known.since.values()) > ns:
                return known.copy()  # already read after the fork: fresher
            c = Covered(
                child, 0, p.exe,
                {k: v for k, v in p.patches.items() if k in inherited},
                {k: v for k, v in p.blocked.items() if k in inherited}, None,
                {k: v for k, v in p.pending.items() if k in inherited},
                dict.fromkeys(inherited, ns), parent,
            )  # fmt: skip
        c.start = self._start_of(child) or 0  # 0: gone already (its exit event follows)
        with self._lock:
            known = self._by_pid.get(child)
            if known is not None and known.since and min(known.since.values()) > ns:
                return known.copy()
            self._by_pid[child] = c
            return c.copy()

    def execed(self, pid: int, ns: int) -> None:
        """pid exec'd at `ns`: what it carried before is gone with the old image (what
        was applied at the exec stop, after it, stays)."""
        with self._lock:
            c = self._by_pid.get(pid)
            if c is None:
                return
            c._drop_before(ns)
            if not c.since:
                del self._by_pid[pid]

    def forget(self, pid: int, exited_ns: int | None = None) -> Covered | None:
        """pid exited (at `exited_ns`, the exit event's time): drop it and return what
        it carried. What was recorded only after that exit is of a newer process that
        reused the pid: it is kept, and None returned."""
        with self._lock:
            c = self._by_pid.get(pid)
            if c is None:
                return None
            if exited_ns and c.since and min(c.since.values()) > exited_ns:
                return None
            del self._by_pid[pid]
            return c

    def bury(self, pid: int) -> None:
        """pid was found gone (not by its exit event): buried, for its exit event."""
        with self._lock:
            c = self._by_pid.get(pid)
            if c is not None and c.buried is None:
                c.buried = time.monotonic_ns()

    def retain(self, keep: Callable[[Covered], bool]) -> None:
        """Bury the entries `keep` refuses (after a full pass: those not alive), and
        drop those buried for longer than EXIT_GRACE_NS."""
        now = time.monotonic_ns()
        with self._lock:
            for pid, c in list(self._by_pid.items()):
                if c.buried is None and not keep(c):
                    c.buried = now
                elif c.buried is not None and now - c.buried > EXIT_GRACE_NS:
                    del self._by_pid[pid]
