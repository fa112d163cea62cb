"""New processes patched before their first instruction, libraries before they run.

fanotify holds the exec (FAN_OPEN_EXEC_PERM on every filesystem) or the library
open (FAN_OPEN_PERM on the inodes of watched library files) while we seize the
thread; then the event is allowed and the thread, now ours, stops where its
patches can be applied before any of its code runs:

- exec: PTRACE_O_TRACEEXEC stops the new image at its exec event (only the
  executable and ld.so mapped, rip at ld.so's entry); the executable's patches
  are applied there, and the process detached.
- library (DT_NEEDED at start, dlopen later): the opening thread is followed
  from system call to system call until the file's executable segment is
  mapped and the loader closes the file; the rest of the process is stopped,
  the library's patches applied, everything detached. ld.so relocates and
  runs the initialisers afterwards, and dlopen returns after that.

Every permission event is answered within milliseconds: the reader thread only
reads events, decides from caches and dispatches; ptrace work happens in
worker threads (a tracee stays with the worker that seized it); a watchdog
allows anything held longer than `hold_limit`. A dying agent releases
everything: closing the fanotify descriptor allows held events, and a dead
tracer's tracees are detached by the kernel and run on unpatched (the engine's
transaction is crash-safe at every step).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import logging
import os
import queue
import select
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from micropatch.agent.events import Event, EventSink
from micropatch.agent.files import FileCache, ModuleFile
from micropatch.errors import (
    AlreadyApplied,
    MicropatchError,
    ProcessError,
    ProcessExited,
    StopTimeout,
)
from micropatch.faults import checkpoint
from micropatch.live.engine import apply_held, holding
from micropatch.live.module import ModuleCache
from micropatch.patch.view import TargetView
from micropatch.process import fanotify, ptrace
from micropatch.process.linux import PTRACE_O_TRACEEXEC, PTRACE_O_TRACESYSGOOD, WALL
from micropatch.process.maps import read_maps
from micropatch.process.priority import realtime
from micropatch.process.procfs import read_status
from micropatch.process.select import ProcessInfo, read_info
from micropatch.process.tracing import Stop, exec_exit, is_group_stop, next_stop, syscall_info
from micropatch.process.world import wait_stop
from micropatch.trust.policy import Admitted

log = logging.getLogger(__name__)

LIBRARY_DIRS = (
    "/lib",
    "/lib64",
    "/usr/lib",
    "/usr/lib64",
    "/usr/local/lib",
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/usr/local/lib/x86_64-linux-gnu",
)
LD_SO_CONF = "/etc/ld.so.conf"
# Filesystems no program is executed from: not worth a mark (marking them may fail too).
PSEUDO_FILESYSTEMS = frozenset(
    (
        "proc", "sysfs", "cgroup", "cgroup2", "devpts", "mqueue", "debugfs", "tracefs",
        "securityfs", "pstore", "bpf", "configfs", "fusectl", "binfmt_misc", "nsfs",
        "efivarfs", "autofs", "rpc_pipefs", "hugetlbfs",
    )
)  # fmt: skip
WORKERS = 4
EXEC_TIMEOUT = 2.0  # seconds from allowing an exec to its exec event stop
FOLLOW_TIMEOUT = 2.0  # seconds a followed thread may take between two system calls
MAX_FOLLOWED_SYSCALLS = 256  # a loader maps a library within a few dozen
AFTER_MAPPED_SYSCALLS = 16  # patch anyway if the file is not closed this soon after
READER_PRIORITY = 5  # SCHED_FIFO of the reader and the watchdog, below the engine's stops
CLAIMED_LIMIT = 1.0  # seconds a worker may keep a claimed event before the watchdog allows it
RESCAN_INTERVAL = 10.0  # seconds between two looks for new mounts and catalog changes
REMARK_INTERVAL = 60.0  # seconds between two looks for new library files (an upgrade)
_NR_MMAP = 9
_NR_CLOSE = 3


class Catalog(Protocol):
    """What NewProcesses asks the agent (agent/service.py implements it)."""

    def wanted(self, info: ProcessInfo, module: ModuleFile) -> list[Admitted]:
        """Enabled, non-excluded admitted patches whose target identity is this module
        file, for this process (policy applied)."""
        ...

    def watched(self) -> list[TargetView]:
        """The targets of every enabled patch: their files are marked."""
        ...

    def changed(self) -> threading.Event | int:
        """Set (an Event, cleared here) or bumped (a counter) when the store or the
        policy changed: the marks are redone."""
        ...


@dataclass(eq=False)
class _Held:
    """A permission event waiting for our answer."""

    fd: int
    tid: int
    since: float  # time.monotonic() when read
    answered: bool = False
    claimed: float = 0.0  # monotonic time a worker took it on (0: not yet)


@dataclass(eq=False)
class _Follow:
    """A thread we trace, and the watched files it may be loading."""

    tid: int
    files: dict[tuple[int, int], ModuleFile] = field(default_factory=dict)


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
        library_dirs: Sequence[str] | None = None,
        workers: int = WORKERS,
        on_hold: Callable[[float], None] | None = None,
    ) -> None:
        """`modules`: parsed ELF files shared with the rest of the agent (the engine's
        cache); `files`: the identity cache (a new one by default); `library_dirs`:
        where watched libraries are looked for besides ld.so.conf's directories and
        what running processes map (default: the standard directories); `on_hold`:
        told how many seconds each permission event was held (metrics)."""
        self.on_hold = on_hold
        self.catalog = catalog
        self.report = report
        self.modules = modules
        self.hold_limit = hold_limit
        self.files = files or FileCache()
        self.library_dirs = tuple(LIBRARY_DIRS if library_dirs is None else library_dirs)
        self.worker_count = workers
        self.stats: dict[str, float | int] = {
            "execs": 0,  # exec permission events seen
            "opens": 0,  # library permission events seen
            "held": 0,  # events handed to a worker
            "max_hold_ms": 0.0,
            "released": 0,  # allowed by the watchdog
            "patched_exec": 0,  # processes patched at their exec
            "patched_load": 0,  # library loads patched
            "not_loads": 0,  # a watched file opened but not mapped (cp, a checksum)
            "exec_failed": 0,  # seized, but no exec followed
            "skipped": 0,  # traced by someone else
            "failed": 0,  # a patch that did not apply
            "filesystems": 0,  # filesystems marked
            "libraries": 0,  # library files marked
        }
        self._lock = threading.Lock()
        self._fan: fanotify.Fanotify | None = None
        self._held: dict[int, _Held] = {}
        self._following: dict[int, _Follow] = {}
        self._names: dict[str, list[TargetView]] = {}
        self._libs: dict[tuple[int, int], ModuleFile] = {}
        self._lib_paths: dict[tuple[int, int], str] = {}
        self._devices: set[int] = set()
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._stopping = threading.Event()
        self._holding = threading.Event()  # set while an event may be held (watchdog)
        self._wake_r, self._wake_w = -1, -1
        self._last_change: object = None

    # --- life cycle --------------------------------------------------------------

    def start(self) -> None:
        """Create the fanotify group, mark, and start the reader, workers and watchdog.
        FanotifyUnavailable if the kernel or our privileges do not allow it."""
        self._fan = fanotify.Fanotify()
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stopping.clear()
        self._mark_filesystems()
        self.remark()
        threads = [threading.Thread(target=self._read, name="newproc-reader", daemon=True)]
        threads += [
            threading.Thread(target=self._work, name=f"newproc-worker-{i}", daemon=True)
            for i in range(self.worker_count)
        ]
        threads.append(threading.Thread(target=self._watch, name="newproc-watchdog", daemon=True))
        self._threads = threads
        for thread in threads:
            thread.start()

    def stop(self) -> None:
        """Close the fanotify group (the kernel allows every held event) and let every
        tracee go."""
        self._stopping.set()
        self._holding.set()
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        for thread in self._threads:
            if thread.name == "newproc-reader":
                thread.join()
        with self._lock:
            fan, self._fan = self._fan, None
            for held in self._held.values():
                held.answered = True
                with contextlib.suppress(OSError):
                    os.close(held.fd)
            self._held.clear()
        if fan is not None:
            fan.close()
        for _ in range(self.worker_count):
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()  # a worker detaches its tracee on its way out
        self._threads = []
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)

    def remark(self) -> None:
        """The catalog changed: mark the files of the watched targets (and unmark the rest)."""
        targets = self.catalog.watched()
        names: dict[str, list[TargetView]] = {}
        for target in targets:
            names.setdefault(target.module, []).append(target)
        libs: dict[tuple[int, int], ModuleFile] = {}
        paths: dict[tuple[int, int], str] = {}
        for path in self._candidates(set(names)):
            module = self.files.of_path(path)
            if module is None or not any(module.matches(t) for t in names[module.name]):
                continue
            libs.setdefault(module.inode, module)
            paths.setdefault(module.inode, path)
        fan = self._fan
        if fan is None:
            return
        for inode, path in paths.items():
            if inode in self._libs:
                continue
            try:
                fan.mark(path, fanotify.FAN_OPEN_PERM)
            except OSError as e:
                log.warning("cannot watch %s for library loads: %s", path, e.strerror)
                libs.pop(inode, None)
        for inode, path in self._lib_paths.items():
            if inode not in libs:
                with contextlib.suppress(OSError):  # gone with its inode already
                    fan.mark(path, fanotify.FAN_OPEN_PERM, add=False)
        with self._lock:
            self._names = names
            self._libs = libs
            self._lib_paths = {inode: paths[inode] for inode in libs}
        self.stats["libraries"] = len(libs)
        log.info("watching %d target names, %d library files", len(names), len(libs))

    # --- marks -------------------------------------------------------------------

    def _mark_filesystems(self) -> None:
        """FAN_OPEN_EXEC_PERM on every filesystem not marked yet (new mounts too)."""
        fan = self._fan
        if fan is None:
            return
        for dev, mount, fstype in _mounts():
            if dev in self._devices or fstype in PSEUDO_FILESYSTEMS:
                continue
            try:
                fan.mark(mount, fanotify.FAN_OPEN_EXEC_PERM, fanotify.FAN_MARK_FILESYSTEM)
            except OSError as e:
                log.info("not watching execs on %s (%s): %s", mount, fstype, e.strerror)
            self._devices.add(dev)  # tried: a failed one is not tried on every rescan
        self.stats["filesystems"] = len(self._devices)

    def _candidates(self, names: set[str]) -> list[str]:
        dirs = list(self.library_dirs) + _ld_so_conf_dirs(LD_SO_CONF)
        found = [os.path.join(d, n) for d in dict.fromkeys(dirs) for n in names]
        found = [p for p in found if os.path.isfile(p)]
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ProcessError):
                for m in read_maps(int(entry.name)):
                    if m.inode and m.name in names and not m.deleted:
                        found.append(m.file_path)
        return list(dict.fromkeys(found))

    # --- reader ------------------------------------------------------------------

    def _read(self) -> None:
        # Real-time: on a loaded machine every exec on the host waits for this thread.
        # It never spins (it sleeps in poll), which is what makes SCHED_FIFO safe here.
        with realtime(READER_PRIORITY):
            self._read_events()

    def _read_events(self) -> None:
        fan = self._fan
        assert fan is not None
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
                held = _Held(event.fd, event.pid, time.monotonic())
                with self._lock:
                    self._held[event.fd] = held
                try:
                    self._decide(event.mask, held)
                except Exception:
                    log.exception("deciding on an event of thread %d failed", held.tid)
                    self._answer(held)
                if not held.answered:
                    self._holding.set()  # the watchdog looks while anything is held

    def _decide(self, mask: int, held: _Held) -> None:
        """Answer at once, or hand the event to a worker: from caches, never blocking."""
        if mask & fanotify.FAN_OPEN_EXEC_PERM:
            self._count("execs")
            path = os.readlink(f"/proc/self/fd/{held.fd}")
            targets = self._names.get(os.path.basename(path))
            if not targets or self._ours(held.tid) or held.tid in self._following:
                self._answer(held)
                return
            # A file version seen before is decided here; a new one is hashed by a
            # worker (once), not by the reader, which other execs wait for.
            known = self.files.peek(held.fd, path)
            if known is not None and not any(known.matches(t) for t in targets):
                self._answer(held)
                return
            follow = _Follow(held.tid)
            with self._lock:
                self._following[held.tid] = follow
            self._dispatch(lambda: self._exec(held, known, path, targets, follow))
            return
        self._count("opens")
        st = os.fstat(held.fd)
        module_or_none = self._libs.get((st.st_dev, st.st_ino))
        if module_or_none is None or self._ours(held.tid):
            self._answer(held)
            return
        module = module_or_none
        with self._lock:
            follow_or_none = self._following.get(held.tid)
            if follow_or_none is not None:
                # Already ours (loading another watched library, or exec'ing): that
                # worker looks for this file's mapping too.
                follow_or_none.files[module.inode] = module
        if follow_or_none is not None:
            self._answer(held)
            return
        follow = _Follow(held.tid, {module.inode: module})
        with self._lock:
            self._following[held.tid] = follow
        self._dispatch(lambda: self._load(held, follow))

    def _count(self, name: str) -> None:
        with self._lock:
            self.stats[name] += 1

    def _dispatch(self, job: Callable[[], None]) -> None:
        self._count("held")
        self._jobs.put(job)

    @staticmethod
    def _ours(tid: int) -> bool:
        """A thread of the agent itself (the engine reading a marked file)."""
        return os.path.exists(f"/proc/self/task/{tid}")

    def _answer(self, held: _Held) -> bool:
        """Allow the event, once; False if it was answered already."""
        with self._lock:
            if held.answered:
                return False
            held.answered = True
            self._held.pop(held.fd, None)
            hold = (time.monotonic() - held.since) * 1e3
            if hold > self.stats["max_hold_ms"]:
                self.stats["max_hold_ms"] = hold
            if self.on_hold is not None:
                self.on_hold(hold / 1e3)
            try:
                if self._fan is not None:
                    self._fan.answer(held.fd)
            except OSError as e:
                log.warning("answering the event of thread %d failed: %s", held.tid, e)
            finally:
                os.close(held.fd)
        return True

    def _claim(self, held: _Held) -> bool:
        """A worker takes the event on: False if the watchdog allowed it meanwhile."""
        with self._lock:
            if held.answered:
                return False
            held.claimed = time.monotonic()
            return True

    # --- watchdog ----------------------------------------------------------------

    def _watch(self) -> None:
        with realtime(READER_PRIORITY):
            self._watch_holds()

    def _watch_holds(self) -> None:
        # Looks every tenth of hold_limit, and allows an event one look early: no event
        # waits longer than hold_limit plus this thread's own wake-up.
        # With nothing held it sleeps until the reader holds something (or the next
        # rescan): an idle agent does not wake up hundreds of times a second.
        period = max(self.hold_limit / 10, 0.001)
        next_scan = time.monotonic() + RESCAN_INTERVAL
        next_remark = time.monotonic() + REMARK_INTERVAL
        while not self._stopping.is_set():
            with self._lock:
                idle = not self._held
                if idle:
                    self._holding.clear()
            if idle:
                self._holding.wait(max(0.0, next_scan - time.monotonic()))
            else:
                self._stopping.wait(period)
            now = time.monotonic()
            with self._lock:
                late = [
                    h
                    for h in self._held.values()
                    if (not h.claimed and now - h.since > self.hold_limit - period)
                    or (h.claimed and now - h.claimed > CLAIMED_LIMIT)
                ]
            for held in late:
                if self._answer(held):
                    self._count("released")
                    log.warning(
                        "allowed the open of thread %d after %.0f ms unanswered: it runs "
                        "unpatched (agent too busy)", held.tid, (now - held.since) * 1e3,
                    )  # fmt: skip
            changed = self._catalog_changed()
            if now >= next_scan or changed:
                next_scan = now + RESCAN_INTERVAL
                try:
                    self._mark_filesystems()
                    if changed or now >= next_remark:
                        next_remark = now + REMARK_INTERVAL
                        self.remark()
                except Exception:
                    log.exception("rescanning mounts and marks failed")

    def wake(self) -> None:
        """The catalog changed: mark its files now, not at the next rescan (a patch
        just added reaches the next exec)."""
        self._holding.set()

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

    # --- workers -----------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                job()
            except Exception:
                log.exception("a new-process job failed")

    def _seize(self, held: _Held, options: int, module: ModuleFile) -> bool:
        """Seize the event's thread, then allow the event. False (the event allowed, the
        thread not ours) if it is gone, traced by another, or the watchdog was first."""
        tid = held.tid
        if not self._claim(held):
            return False
        try:
            ptrace.seize(tid, options)
        except OSError as e:
            self._answer(held)
            if e.errno == errno.EPERM:
                tracer = 0
                with contextlib.suppress(ProcessError):
                    tracer = read_status(tid).tracer_pid
                self._count("skipped")
                self._event(
                    "skipped",
                    tid,
                    module,
                    message=f"thread {tid} is traced by pid {tracer}: not patched"
                    if tracer
                    else f"cannot trace thread {tid}: not patched",
                    data={"tracer": tracer},
                )
            return False
        return True

    def _exec(
        self,
        held: _Held,
        known: ModuleFile | None,
        path: str,
        targets: list[TargetView],
        follow: _Follow,
    ) -> None:
        tid = held.tid
        try:
            if not self._claim(held):
                return
            module = known or self.files.of_fd(held.fd, path)
            try:
                tgid = read_status(tid).tgid
            except ProcessError:
                self._answer(held)
                return
            if not any(module.matches(t) for t in targets):
                self._answer(held)
                return
            if not self._seize(held, PTRACE_O_TRACEEXEC | PTRACE_O_TRACESYSGOOD, module):
                return
            checkpoint("newproc-exec-held")
            self._answer(held)
            tracee = tid
            try:
                tracee = self._at_exec(tid, tgid, module, follow)
            except (StopTimeout, ProcessExited) as e:
                log.debug("thread %d at its exec: %s", tid, e)
            finally:
                self._unfollow(tid)  # before the detach: its next open is a new event
                _let_go(tracee)
        finally:
            self._unfollow(tid)

    def _at_exec(self, tid: int, tgid: int, module: ModuleFile, follow: _Follow) -> int:
        """Wait for the exec event stop and patch there; returns the tracee's id then
        (a thread other than the leader that execs takes the leader's id)."""
        found = _wait_exec(tid, tgid, EXEC_TIMEOUT, self._stopping)
        if found is None:
            return tid  # exited
        pid, stop = found
        if not stop.exec:
            self._count("exec_failed")  # no exec within the timeout: it failed
            return pid
        checkpoint("newproc-exec-stopped")
        info = read_info(pid)
        work = [(module, self.catalog.wanted(info, module))]
        with self._lock:  # ld.so, if watched, reported its open to this follow
            files = [f for f in follow.files.values() if f.inode != module.inode]
        if files:
            now = _executable_inodes(pid)
            work += [(f, self.catalog.wanted(info, f)) for f in files if f.inode in now]
        work = [(m, w) for m, w in work if w]
        if not work:
            return pid
        exec_exit(pid, pid, FOLLOW_TIMEOUT)
        if self._patch(pid, [pid], info, work, "exec"):
            self._count("patched_exec")
        return pid

    def _load(self, held: _Held, follow: _Follow) -> None:
        tid = held.tid
        module = next(iter(follow.files.values()))
        try:
            if not self._claim(held):
                return
            # the marked inode, but still that build? (a file rewritten in place)
            current = self.files.of_fd(held.fd, module.path)
            if current.identity != module.identity:
                log.info("%s changed since it was marked: not followed", module.path)
                self._answer(held)
                return
            if not self._seize(held, PTRACE_O_TRACESYSGOOD, module):
                return
            try:
                ptrace.interrupt(tid)
            finally:
                self._answer(held)
            try:
                self._follow_load(tid, follow)
            except (StopTimeout, ProcessExited) as e:
                self._count("not_loads")
                log.debug("thread %d, followed: %s", tid, e)
            finally:
                self._unfollow(tid)  # before the detach: its next open is a new event
                _let_go(tid)
        finally:
            self._unfollow(tid)

    def _unfollow(self, tid: int) -> None:
        with self._lock:
            self._following.pop(tid, None)

    def _follow_load(self, tid: int, follow: _Follow) -> None:
        pid = read_status(tid).tgid
        before = _executable_inodes(pid)
        stop: Stop | None = Stop(_must_stop(pid, tid))  # the interrupt, once open() returned
        checkpoint("newproc-load-following")
        opened = -1
        regs = ptrace.get_regs(tid)
        if regs.orig_rax in (2, 257, 437):  # open, openat, openat2 returned the descriptor
            opened = regs.rax
            if opened >= 1 << 63:  # the open failed after all: nothing to load
                return
        mapped: set[tuple[int, int]] = set()
        since_mapped = 0
        entry_nr = -1
        entry_args: tuple[int, ...] = ()
        for _ in range(MAX_FOLLOWED_SYSCALLS):
            if self._stopping.is_set():
                return
            stop = next_stop(pid, tid, None if stop is None else stop, FOLLOW_TIMEOUT)
            if is_group_stop(stop):
                stop = None
                continue
            if not stop.syscall:
                continue
            info = syscall_info(tid)
            if info is None:
                continue
            if info.entry:
                entry_nr, entry_args = info.nr, info.args
                continue
            if mapped:
                since_mapped += 1
            if entry_nr == _NR_MMAP and info.result >= 0:
                with self._lock:
                    files = dict(follow.files)
                now = _executable_inodes(pid)
                mapped |= {inode for inode in files if inode in now and inode not in before}
            closed = entry_nr == _NR_CLOSE and entry_args and entry_args[0] == opened
            if mapped and (closed or since_mapped >= AFTER_MAPPED_SYSCALLS):
                info_ = read_info(pid)
                with self._lock:
                    files = dict(follow.files)
                work = [(files[i], self.catalog.wanted(info_, files[i])) for i in mapped]
                work = [(m, w) for m, w in work if w]
                if work and self._patch(pid, [tid], info_, work, "load"):
                    self._count("patched_load")
                return
            if closed:
                break
        self._count("not_loads")
        log.debug("thread %d opened a watched file without loading it", tid)

    def _patch(
        self,
        pid: int,
        held: list[int],
        info: ProcessInfo,
        work: Iterable[tuple[ModuleFile, list[Admitted]]],
        when: str,
    ) -> bool:
        """Stop the rest of the process and apply; True if anything was applied."""
        applied = False
        started = time.perf_counter()
        with holding(pid, held) as proc:
            for module, patches in work:
                for patch in patches:
                    try:
                        outcome = apply_held(patch, proc, modules=self.modules)
                    except AlreadyApplied:
                        continue
                    except MicropatchError as e:
                        self._count("failed")
                        self._event(
                            "failed", pid, module, patch=patch, exe=info.exe,
                            message=str(e), data={"when": when, **e.fields()},
                        )  # fmt: skip
                        continue
                    applied = True
                    ms = round((time.perf_counter() - started) * 1e3, 3)
                    at = "its exec" if when == "exec" else f"the load of {module.name}"
                    self._event(
                        "applied", pid, module, patch=patch, exe=info.exe,
                        message=f"applied {patch.id} v{patch.version} in pid {pid} "
                        f"({info.exe}) at {at}, before any of its code ran; {ms:.2f} ms",
                        data={"when": when, "sites": outcome.sites, "ms": ms},
                    )  # fmt: skip
        return applied

    def _event(
        self,
        kind: str,
        pid: int,
        module: ModuleFile,
        *,
        patch: Admitted | None = None,
        exe: str | None = None,
        message: str = "",
        data: dict[str, object] | None = None,
    ) -> None:
        try:
            self.report(
                Event(
                    kind,
                    time.time(),
                    pid=pid,
                    exe=exe,
                    patch_id=patch.id if patch else None,
                    version=patch.version if patch else None,
                    module=module.name,
                    message=message,
                    data=data or {},
                )
            )
        except Exception:
            log.exception("reporting an event failed")


# --- helpers -------------------------------------------------------------------------


def _wait_exec(
    tid: int, tgid: int, timeout: float, stopping: threading.Event
) -> tuple[int, Stop] | None:
    """Let a seized exec'ing thread run to its exec event stop, passing signals on.
    Returns (the tracee's id, the stop): the exec event stop, or after `timeout` (the
    exec failed and the old image runs on) any stop we brought it to, ready to be
    detached; None if it exited. The exec event of a thread that is not the
    leader is reported under the leader's id, which it takes."""
    deadline = time.monotonic() + timeout
    ids = [tid] if tid == tgid else [tid, tgid]
    delay = 0.00002
    interrupted = False
    while True:
        for who in ids:
            try:
                waited, status = os.waitpid(who, os.WNOHANG | WALL)
            except ChildProcessError:
                continue
            if waited != who:
                continue
            if not os.WIFSTOPPED(status):
                return None
            stop = Stop(os.WSTOPSIG(status) | ((status >> 16) << 8))
            if stop.exec or interrupted:
                return who, stop
            ptrace.cont(who, stop.delivered_signal)
        if not interrupted and (time.monotonic() > deadline or stopping.is_set()):
            interrupted = True
            deadline = time.monotonic() + FOLLOW_TIMEOUT
            with contextlib.suppress(OSError):
                ptrace.interrupt(tid)
        elif interrupted and time.monotonic() > deadline:
            raise StopTimeout(f"thread {tid} did not stop after its failed exec")
        time.sleep(delay)
        delay = min(delay * 2, 0.0005)


def _wait(tid: int, timeout: float) -> int | None:
    """A stop status, None if tid exited, -1 if it did not stop within timeout."""
    try:
        return wait_stop(tid, tid, timeout)
    except StopTimeout:
        return -1
    except ProcessExited:
        return None


def _must_stop(pid: int, tid: int) -> int:
    status = wait_stop(pid, tid, FOLLOW_TIMEOUT)
    if status is None:
        raise ProcessError(f"process {pid} exited while followed")
    return status


def _interrupt(tid: int) -> None:
    """Bring a running tracee to a stop, so that it can be detached."""
    with contextlib.suppress(OSError):
        ptrace.interrupt(tid)
        _wait(tid, FOLLOW_TIMEOUT)


def _let_go(tid: int) -> None:
    """Detach a tracee whatever stop it is in (interrupting it first if it runs)."""
    try:
        ptrace.detach(tid)
        return
    except OSError as e:
        if e.errno == errno.ESRCH and not os.path.exists(f"/proc/{tid}"):
            return
    _interrupt(tid)
    with contextlib.suppress(OSError):
        ptrace.detach(tid)


def _executable_inodes(pid: int) -> set[tuple[int, int]]:
    """(dev, ino) of every file pid maps executable."""
    found = set()
    for m in read_maps(pid):
        if m.inode and m.executable:
            major, minor = (int(x, 16) for x in m.dev.split(":"))
            found.add((os.makedev(major, minor), m.inode))
    return found


def _unescape(path: str) -> str:
    r"""mountinfo escapes space, tab, newline and backslash as \ooo."""
    if "\\" not in path:
        return path
    return path.encode().decode("unicode_escape").encode("latin-1").decode()


def _mounts() -> list[tuple[int, str, str]]:
    """(device, mount point, filesystem type) of every mount, from /proc/self/mountinfo."""
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            try:
                sep = fields.index("-")
            except ValueError:
                continue
            major, minor = (int(x) for x in fields[2].split(":"))
            found.append((os.makedev(major, minor), _unescape(fields[4]), fields[sep + 1]))
    return found


def _ld_so_conf_dirs(path: str, depth: int = 0) -> list[str]:
    """The directories ld.so.conf lists (following its `include` globs)."""
    dirs: list[str] = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return dirs
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("include") and depth < 4:
            pattern = line.split(None, 1)[1] if " " in line else ""
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.dirname(path), pattern)
            for included in sorted(glob.glob(pattern)):
                dirs += _ld_so_conf_dirs(included, depth + 1)
        elif os.path.isabs(line):
            dirs.append(line)
    return dirs
