"""New processes patched before their first instruction, libraries before they run.

fanotify holds the exec (FAN_OPEN_EXEC_PERM on every watched filesystem) or the
library open (FAN_OPEN_PERM on the inode of every copy of a patched module the
index found, agent/modindex.py) while a worker seizes the thread; then the
event is allowed and the thread, now ours, stops where its patches can be
applied before any of its code runs (agent/follow.py):

- exec: PTRACE_O_TRACEEXEC stops the new image at its exec event (only the
  executable and ld.so mapped, rip at ld.so's entry); the executable's patches
  are applied there, and the process detached.
- library (DT_NEEDED at start, dlopen later, by any route: rpath, runpath,
  $ORIGIN, LD_LIBRARY_PATH, an absolute path): the opening thread is followed
  from system call to system call until the file's executable segment is
  mapped and the loader closes the file; the rest of the process is stopped,
  the library's patches applied, everything detached. ld.so relocates and runs
  the initialisers afterwards, and dlopen returns after that.

The parts: the index and its thread (agent/indexer.py) say which files are
copies; `Holds` (agent/holds.py) answers every event once and its watchdog
allows what waits too long; `Workers` (agent/workers.py) starts a thread per
held event, so a burst of starts is seized at once; `StopPatcher`
(agent/atstop.py) applies at the stop; `LateWatch` (agent/late.py) patches live
what was let through or mapped by a route that could not be held.

Every permission event is answered within milliseconds: the reader thread only
reads events, decides from the index and dispatches. A dying agent releases
everything: closing the fanotify descriptor allows held events, and a dead
tracer's tracees are detached by the kernel and run on unpatched (the engine's
transaction is crash-safe at every step).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from micropatch.agent.atstop import StopPatcher
from micropatch.agent.events import EventSink
from micropatch.agent.files import FileCache, ModuleFile
from micropatch.agent.filesystems import Mount
from micropatch.agent.holds import READER_PRIORITY, Held, Holds
from micropatch.agent.indexer import Indexer
from micropatch.agent.late import RELEASED, LateWatch
from micropatch.agent.modindex import Changes, ModuleIndex
from micropatch.agent.seize import Following, Seizer
from micropatch.agent.workers import Workers
from micropatch.errors import ProcessError
from micropatch.live.mapped import ModuleCache
from micropatch.patch.view import TargetView
from micropatch.process import fanotify
from micropatch.process.priority import realtime
from micropatch.process.procfs import read_status
from micropatch.process.select import ProcessInfo
from micropatch.trust.admission import Admitted

log = logging.getLogger(__name__)

WORKERS = 64  # threads seizing and patching at once, at most (started on demand)


class Catalog(Protocol):
    """What NewProcesses asks the agent (agent/service.py implements it)."""

    def wanted(self, info: ProcessInfo, module: ModuleFile) -> list[Admitted]:
        """Enabled, non-excluded admitted patches whose target identity is this module
        file, for this process (policy applied)."""
        ...

    def watched(self) -> list[TargetView]:
        """The targets of every enabled patch: their copies are indexed and marked."""
        ...

    def changed(self) -> threading.Event | int:
        """Set (an Event, cleared here) or bumped (a counter) when the store or the
        policy changed: the index looks for the new targets."""
        ...


class NewProcesses:
    """Patches new processes at exec and libraries at load (see the module doc)."""

    def __init__(
        self,
        catalog: Catalog,
        report: EventSink,
        *,
        modules: ModuleCache,
        hold_limit: float = 0.05,
        files: FileCache | None = None,
        filesystems: Sequence[str] = (),
        library_dirs: Sequence[str] = (),
        workers: int = WORKERS,
        on_hold: Callable[[float], None] | None = None,
    ) -> None:
        """`modules`: parsed ELF files shared with the rest of the agent (the engine's
        cache); `files`: the identity cache (a new one by default); `filesystems`:
        watch and index only the filesystems holding these paths (default: every
        local one); `library_dirs`: directories indexed besides (e.g. on a network
        filesystem); `workers`: threads at most; `on_hold`: told how many seconds
        each permission event was held (metrics)."""
        self.catalog = catalog
        self.report = report
        self.modules = modules
        self.hold_limit = hold_limit
        self.files = files or FileCache()
        self.index = ModuleIndex(self.files)
        self.patcher = StopPatcher(report, modules)
        self.filesystems = tuple(filesystems)
        self.library_dirs = tuple(library_dirs)
        self.worker_count = workers
        self.on_hold = on_hold
        self.stats: dict[str, float | int] = {
            "execs": 0,  # exec permission events seen
            "opens": 0,  # library permission events seen
            "held": 0,  # events handed to a worker
            "patched_exec": 0,  # processes patched at their exec
            "patched_load": 0,  # library loads patched
            "late": 0,  # processes patched live after a route the agent could not hold
            "missed": 0,  # ... that ran (or exited) unpatched all the same
            "not_loads": 0,  # a watched file opened but not mapped (cp, a checksum)
            "exec_failed": 0,  # seized, but no exec followed
            "skipped": 0,  # traced by someone else
            "failed": 0,  # a patch that did not apply
            "filesystems": 0,  # filesystems marked for execs
            "copies": 0,  # files marked for library loads
        }
        self._lock = threading.Lock()
        self._fan: fanotify.Fanotify | None = None
        self._holds: Holds | None = None
        self._following = Following()
        self._marked: dict[tuple[int, int], str] = {}  # inode -> the path it was marked by
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = -1, -1
        self._reader: threading.Thread | None = None
        self._last_change: object = None
        self.workers = Workers(workers, priority=READER_PRIORITY)
        self.seizer = Seizer(
            catalog, self.files, self.patcher, self._following, self._count, self._stopping
        )
        self.late = LateWatch(catalog, self.patcher, self._copy_of, self._count)
        self.indexer = Indexer(
            self.index, filesystems=self.filesystems, extra_dirs=self.library_dirs,
            on_change=self._marks, on_found=self.late.scan, on_mount=self._mark_execs,
            tick=self._poll_catalog,
        )  # fmt: skip

    # --- life cycle --------------------------------------------------------------

    def start(self) -> None:
        """Create the fanotify group, start the index (which marks the filesystems
        and walks them in its thread), the reader, the watchdog and the late watch.
        FanotifyUnavailable if the kernel or our privileges do not allow it."""
        self._fan = fanotify.Fanotify()
        self._holds = Holds(
            self._fan, hold_limit=self.hold_limit, on_hold=self.on_hold,
            on_release=self._released,
        )  # fmt: skip
        self.seizer.holds = self._holds
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping.clear()
        self.indexer.retarget(self.catalog.watched())
        self._catalog_changed()  # the first look: what follows is a change
        self.indexer.start()
        self.workers.start()
        self._holds.start()
        self.late.start()
        self._reader = threading.Thread(target=self._read, name="newproc-reader", daemon=True)
        self._reader.start()

    def stop(self) -> None:
        """Close the fanotify group (the kernel allows every held event) and let every
        tracee go."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._reader is not None:
            self._reader.join()
            self._reader = None
        if self._holds is not None:
            self._holds.stop()
        fan, self._fan = self._fan, None
        if fan is not None:
            fan.close()
        self.workers.stop()  # a worker detaches its tracee on its way out
        self.late.stop()
        self.indexer.stop()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def wake(self) -> None:
        """The catalog changed: look for its targets now (a patch just added reaches
        the next exec and load once its copies are found)."""
        self.indexer.retarget(self.catalog.watched())

    remark = wake

    def status(self) -> dict[str, Any]:
        """The counters, the index (walks, filesystems watched and skipped)."""
        with self._lock:
            stats = dict(self.stats)
        holds = self._holds
        stats["released"] = holds.released if holds else 0
        stats["max_hold_ms"] = round(holds.max_hold_ms, 3) if holds else 0.0
        stats["max_claim_ms"] = round(holds.max_claim_ms, 3) if holds else 0.0
        stats["workers"] = self.workers.most
        stats["followed"] = self.late.followed()  # processes the late watch looks at
        return {**stats, "index": self.indexer.status()}

    def copies_of(self, target: TargetView) -> list[str]:
        """The paths found holding this target's module build."""
        return self.index.paths_of(target)

    # --- marks -------------------------------------------------------------------

    def _mark_execs(self, mount: Mount) -> None:
        """FAN_OPEN_EXEC_PERM on a filesystem the index watches."""
        fan = self._fan
        if fan is None:
            return
        try:
            fan.mark(mount.point, fanotify.FAN_OPEN_EXEC_PERM, fanotify.FAN_MARK_FILESYSTEM)
        except OSError as e:
            log.warning("not watching execs on %s (%s): %s", mount.point, mount.fstype, e.strerror)
            return
        self._count("filesystems")

    def _marks(self, changes: Changes) -> None:
        """The index changed: FAN_OPEN_PERM on its new copies, off the ones gone."""
        added, removed = changes
        fan = self._fan
        if fan is None:
            return
        for c in removed:
            path = self._marked.pop(c.file.inode, None)
            if path is not None:
                with contextlib.suppress(OSError):  # gone with its inode already
                    fan.mark(path, fanotify.FAN_OPEN_PERM, add=False)
        for c in added:
            if c.file.inode in self._marked:
                continue
            for path in sorted(c.paths):
                try:
                    fan.mark(path, fanotify.FAN_OPEN_PERM)
                except OSError as e:
                    log.warning("cannot watch %s for loads: %s", path, e.strerror)
                    continue
                self._marked[c.file.inode] = path
                break
        with self._lock:
            self.stats["copies"] = len(self._marked)

    def _poll_catalog(self) -> None:
        if self._catalog_changed():
            self.wake()

    def _catalog_changed(self) -> bool:
        changed = self.catalog.changed()
        if isinstance(changed, threading.Event):
            if changed.is_set():
                changed.clear()
                return True
            return False
        if changed != self._last_change:
            first = self._last_change is None
            self._last_change = changed
            return not first
        return False

    def _copy_of(self, inode: tuple[int, int]) -> ModuleFile | None:
        c = self.index.get(inode)
        return c.file if c else None

    # --- reader ------------------------------------------------------------------

    def _read(self) -> None:
        # Real-time: on a loaded machine every exec on the host waits for this thread.
        # It never spins (it sleeps in poll), which is what makes SCHED_FIFO safe here.
        with realtime(READER_PRIORITY):
            self._read_events()

    def _read_events(self) -> None:
        fan, holds = self._fan, self._holds
        assert fan is not None and holds is not None
        poller = select.poll()  # not select(): descriptors may pass FD_SETSIZE
        poller.register(fan.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping.is_set():
            ready = [fd for fd, _ in poller.poll(1000)]
            if fan.fd not in ready:
                continue
            try:
                events = fan.read()
            except OSError as e:
                log.error("reading fanotify events failed: %s", e)
                time.sleep(0.01)  # never a busy loop at real-time priority
                continue
            for event in events:
                if event.overflow:
                    log.warning("fanotify queue overflow: some opens were not seen")
                    continue
                if not event.permission:
                    with contextlib.suppress(OSError):
                        os.close(event.fd)
                    continue
                held = Held(event.fd, event.pid, time.monotonic())
                holds.hold(held)
                try:
                    self._decide(event.mask, held)
                except Exception:
                    log.exception("deciding on an event of thread %d failed", held.tid)
                    holds.answer(held)
                if not held.answered:
                    holds.watch()

    def _decide(self, mask: int, held: Held) -> None:
        """Answer at once, or hand the event to a worker: from the index, never blocking."""
        assert self._holds is not None
        st = os.fstat(held.fd)
        held.inode = (st.st_dev, st.st_ino)
        held.exec = bool(mask & fanotify.FAN_OPEN_EXEC_PERM)
        self._count("execs" if held.exec else "opens")
        copy = self.index.get(held.inode)
        if copy is None or self._ours(held.tid):
            self._holds.answer(held)
            return
        module = copy.file
        if self._following.join(held.tid, module):
            # Already ours (loading another watched library, or exec'ing: ld.so):
            # that worker looks for this file's mapping too.
            self._holds.answer(held)
            return
        follow = self._following.begin(held.tid, {} if held.exec else {module.inode: module})
        self._count("held")
        job = self.seizer.exec if held.exec else self.seizer.load
        self.workers.submit(lambda: job(held, module, follow))

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.stats[name] += n

    @staticmethod
    def _ours(tid: int) -> bool:
        """A thread of the agent itself (the index or the engine reading a marked file)."""
        return os.path.exists(f"/proc/self/task/{tid}")

    def _released(self, held: Held) -> None:
        """The watchdog allowed an event: patch that process once it maps the file."""
        try:
            pid = read_status(held.tid).tgid
        except ProcessError:
            return
        self.late.follow(pid, {held.inode}, RELEASED, held.since, exec=held.exec)
