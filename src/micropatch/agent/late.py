"""Late patching: a module mapping the agent could not hold, patched live within 1 s.

The agent holds execs and library opens (fanotify permission events) so that
new processes are patched before their code runs. Some mappings appear by a
route it could not hold:

- the watchdog allowed a held exec or open because no worker took it on in
  time (agent/holds.py): that process is followed here;
- a file was opened before it was watched (before the agent started, or in the
  moment between a new copy being written and its mark): when the index finds a
  copy (agent/modindex.py), every process is looked at once (`scan`): one that
  maps it already is patched now; one that only holds it open is followed;
- a copy mapped before it was found at all (the same `scan`).

Following is cheap: only the processes named, only their /proc/PID/maps,
polled quickly at first (a released exec maps its executable within
milliseconds) then every 250 ms at most while the file stays open. A process
that maps a watched copy is patched live (`live.engine.apply`, the same
transaction as any other), with a `late` event saying how it got there and how
long after; one that exits first, or fails, is a `late` event with outcome
`missed`. `stats` counts both (`agent status`, the metrics).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from micropatch.agent.atstop import StopPatcher
from micropatch.agent.files import ModuleFile
from micropatch.agent.follow import mapped_names
from micropatch.agent.holds import READER_PRIORITY
from micropatch.agent.workers import in_own_thread
from micropatch.errors import MicropatchError
from micropatch.process.priority import realtime
from micropatch.process.select import ProcessInfo, all_pids, read_info
from micropatch.trust.admission import Admitted

log = logging.getLogger(__name__)

Inode = tuple[int, int]
FIRST_DELAY = 0.002  # seconds before the second look at a followed process
MAX_DELAY = 0.25  # seconds between two looks, at most
RELEASED_FOR = 5.0  # seconds a released open is followed for a mapping
MAX_FOLLOWED = 4096  # processes followed at once; more are left to the periodic pass

RELEASED = "released by the watchdog"
OPENED_BEFORE = "opened before it was watched"
MAPPED_BEFORE = "mapped before it was watched"
# Not late: running when its patch was added (or the agent started); patched as a
# running process is (an `applied` event), not counted among late starts.
RUNNING = "running when its patch was added"


class Wants(Protocol):
    def wanted(self, info: ProcessInfo, module: ModuleFile) -> list[Admitted]: ...


@dataclass
class _Followed:
    pid: int
    inodes: set[Inode]
    reason: str
    since: float  # monotonic: when the route opened (event read, copy found)
    until: float | None  # monotonic deadline; None: while it holds the file open
    exec: bool = False  # a released exec: exiting before being patched is a miss
    due: float = 0.0
    delay: float = FIRST_DELAY
    seen: set[Inode] = field(default_factory=set)


class LateWatch:
    """Follows the processes named (see the module doc), in one thread."""

    def __init__(
        self,
        catalog: Wants,
        patcher: StopPatcher,
        copy_of: Callable[[Inode], ModuleFile | None],
        count: Callable[[str], None],
    ) -> None:
        """`copy_of`: the index's file for an inode; `count`: a stats counter
        ("late", "missed")."""
        self.catalog = catalog
        self.patcher = patcher
        self.copy_of = copy_of
        self.count = count
        self._followed: dict[int, _Followed] = {}
        self._scans: list[tuple[set[Inode], float, bool]] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="newproc-late", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def follow(self, pid: int, inodes: Iterable[Inode], reason: str, since: float,
               *, exec: bool = False) -> None:  # fmt: skip
        """Patch `pid` as soon as it maps one of `inodes` (looked at now, then again)."""
        with self._cond:
            self._add(pid, set(inodes), reason, since, time.monotonic() + RELEASED_FOR, exec)
            self._cond.notify()

    def scan(self, inodes: Iterable[Inode], running: bool = False) -> None:
        """Every process that maps or holds open one of these (new) copies: patched
        now, or followed while it holds them. `running`: found only because patches
        were added, so a process that maps them already is a running one, not late."""
        found = set(inodes)
        if found:
            with self._cond:
                self._scans.append((found, time.monotonic(), running))
                self._cond.notify()

    def followed(self) -> int:
        with self._cond:
            return len(self._followed)

    def _add(self, pid: int, inodes: set[Inode], reason: str, since: float,
             until: float | None, exec: bool) -> None:  # fmt: skip
        current = self._followed.get(pid)
        if current is not None:
            current.inodes |= inodes
            current.due = 0.0
            current.delay = FIRST_DELAY
            if until is not None and current.until is not None:
                current.until = max(current.until, until)
            current.exec |= exec
            return
        if len(self._followed) >= MAX_FOLLOWED:
            log.warning("following %d processes already: pid %d left to the next pass",
                        len(self._followed), pid)  # fmt: skip
            return
        self._followed[pid] = _Followed(pid, inodes, reason, since, until, exec)

    # --- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        # Real-time as the workers are (agent/workers.py): a released process runs
        # unpatched until this thread gets a CPU. It only sleeps (a timed wait).
        with realtime(READER_PRIORITY):
            self._follow_all()

    def _follow_all(self) -> None:
        while True:
            with self._cond:
                if self._stopping:
                    return
                now = time.monotonic()
                due = [f for f in self._followed.values() if f.due <= now]
                scans, self._scans = self._scans, []
                if not due and not scans:
                    wake = min((f.due for f in self._followed.values()), default=now + 3600)
                    self._cond.wait(max(0.0, wake - now))
                    continue
            for inodes, since, running in scans:
                try:
                    self._scan(inodes, since, running)
                except Exception:
                    log.exception("looking for processes using new copies failed")
            for f in due:
                try:
                    self._look(f)
                except Exception:
                    log.exception("following process %d failed", f.pid)
                    self._done(f)

    def _scan(self, inodes: set[Inode], since: float, running: bool) -> None:
        me = os.getpid()
        for pid in all_pids():
            if pid == me:
                continue
            try:
                names = mapped_names(pid)
            except MicropatchError:
                continue
            mapped = inodes & names.keys()
            held = set() if mapped else _open_inodes(pid, inodes)
            if mapped or held:
                with self._cond:
                    until = time.monotonic() + RELEASED_FOR if mapped else None
                    reason = (RUNNING if running else MAPPED_BEFORE) if mapped else OPENED_BEFORE
                    self._add(pid, mapped | held, reason, since, until, False)

    def _look(self, f: _Followed) -> None:
        now = time.monotonic()
        try:
            names = mapped_names(f.pid)
        except MicropatchError:
            if f.exec:
                self._missed(f, None, "it exited before it could be patched")
            self._done(f)
            return
        mapped = (f.inodes & names.keys()) - f.seen
        if mapped:
            f.seen |= mapped
            self._patch(f, mapped, names)
        still = f.until is None and bool(_open_inodes(f.pid, f.inodes - f.seen))
        expired = f.until is not None and now > f.until
        if (f.seen and not (f.inodes - f.seen)) or expired or (f.until is None and not still):
            if expired and f.exec and not f.seen:
                self._missed(f, None, "its executable was never mapped")
            self._done(f)
            return
        with self._cond:
            f.due = now + f.delay
            f.delay = min(f.delay * 2, MAX_DELAY)

    def _patch(self, f: _Followed, mapped: set[Inode], names: dict[Inode, str]) -> None:
        try:
            info = read_info(f.pid)
        except MicropatchError:
            self._missed(f, None, "it exited before it could be patched")
            return
        work = []
        for inode in mapped:
            module = self.copy_of(inode)
            if module is not None:
                wanted = self.catalog.wanted(info, module)
                if wanted:
                    work.append((module, wanted))
        if not work:
            return
        try:
            when = "running" if f.reason == RUNNING else "late"
            applied, failed = in_own_thread(
                lambda: self.patcher.live(f.pid, info, work, when, names)
            )
        except OSError:  # the engine reading /proc/PID/map_files of a process just gone
            self._missed(f, work[0][0], "it exited before it could be patched")
            return
        except MicropatchError as e:
            self._missed(f, work[0][0], f"it could not be patched: {e}")
            return
        if failed and not applied:
            self._missed(f, work[0][0], "its patches failed (see the failed events)")
            return
        if not applied or f.reason == RUNNING:
            return  # carried already (another path was first), or not late: `applied` said it
        delay = (time.monotonic() - f.since) * 1e3
        self.count("late")
        module = work[0][0]
        self.patcher.event(
            "late", f.pid, module, exe=info.exe,
            message=f"pid {f.pid} ({info.exe}) mapped {module.name}, {f.reason}: "
            f"patched live {delay:.0f} ms later",
            data={"outcome": "patched", "reason": f.reason, "delay_ms": round(delay, 1),
                  "patches": sorted({p.id for _, ps in work for p in ps})},
        )  # fmt: skip

    def _missed(self, f: _Followed, module: ModuleFile | None, why: str) -> None:
        if f.reason == RUNNING:
            # Not a start, so no late miss: a patch that failed is a `failed` event; the
            # rest is said in the log, and the next pass tries again.
            log.warning("pid %d (running when its patch was added): %s", f.pid, why)
            return
        self.count("missed")
        self.patcher.event(
            "late", f.pid, module,
            message=f"pid {f.pid} ran unpatched: {f.reason}, and {why}",
            data={"outcome": "missed", "reason": f.reason},
        )  # fmt: skip

    def _done(self, f: _Followed) -> None:
        with self._cond:
            if self._followed.get(f.pid) is f:
                del self._followed[f.pid]


def _open_inodes(pid: int, inodes: set[Inode]) -> set[Inode]:
    """Which of `inodes` process pid holds open now."""
    found: set[Inode] = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                st = os.stat(f"/proc/{pid}/fd/{fd}")
                if (st.st_dev, st.st_ino) in inodes:
                    found.add((st.st_dev, st.st_ino))
    return found
