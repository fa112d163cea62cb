"""The worker jobs: seize the thread of a held event, follow it to its stop, patch.

An exec: seize with PTRACE_O_TRACEEXEC, allow the event, wait for the exec event
stop (agent/follow.py `wait_exec`), move on to execve's exit and apply the
executable's patches (and ld.so's, if it is watched) there. Past the seize, jobs
take turns (`PATCHING` at once): a seized tracee waits in its stop, harmlessly,
while the interpreter serves the next seize first. A library open:
seize and interrupt, allow the event, follow the thread's system calls until
the file is mapped and closed (`follow_load`), and apply there. Each job runs
in one worker thread from the seize to the detach (ptrace requests come from
the tracer); a thread the agent already follows reports a second watched file
to the same job (`Following`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from micropatch.agent.atstop import StopPatcher
from micropatch.agent.files import FileCache, ModuleFile
from micropatch.agent.follow import follow_load, let_go, mapped_names, wait_exec
from micropatch.agent.holds import READER_PRIORITY, Held, Holds
from micropatch.errors import ProcessError, ProcessExited, StopTimeout
from micropatch.faults import checkpoint
from micropatch.process import ptrace
from micropatch.process.linux import PTRACE_O_TRACEEXEC, PTRACE_O_TRACESYSGOOD
from micropatch.process.priority import realtime
from micropatch.process.procfs import read_status
from micropatch.process.select import ProcessInfo, read_info
from micropatch.process.tracing import exec_exit
from micropatch.trust.admission import Admitted

log = logging.getLogger(__name__)

EXEC_TIMEOUT = 2.0  # seconds from allowing an exec to its exec event stop
FOLLOW_TIMEOUT = 2.0  # seconds a stopped tracee may take to go on
PATCHING = 2  # jobs past their seize at once (the others' tracees wait in their stop)
Inode = tuple[int, int]


class Wants(Protocol):
    """What the jobs ask the catalog (NewProcesses' Catalog)."""

    def wanted(self, info: ProcessInfo, module: ModuleFile) -> list[Admitted]: ...


@dataclass(eq=False)
class Follow:
    """A thread we trace, and the watched files it may be loading."""

    tid: int
    files: dict[Inode, ModuleFile] = field(default_factory=dict)


class Following:
    """The threads the agent traces now (thread-safe)."""

    def __init__(self) -> None:
        self._threads: dict[int, Follow] = {}
        self._lock = threading.Lock()

    def join(self, tid: int, module: ModuleFile) -> bool:
        """A thread already ours opened another watched file: its job looks for that
        file's mapping too. False if the thread is not ours."""
        with self._lock:
            follow = self._threads.get(tid)
            if follow is None:
                return False
            follow.files[module.inode] = module
            return True

    def begin(self, tid: int, files: dict[Inode, ModuleFile]) -> Follow:
        with self._lock:
            follow = self._threads[tid] = Follow(tid, dict(files))
            return follow

    def files(self, follow: Follow) -> dict[Inode, ModuleFile]:
        with self._lock:
            return dict(follow.files)

    def end(self, tid: int) -> None:
        with self._lock:
            self._threads.pop(tid, None)


class Seizer:
    """The jobs (see the module doc)."""

    def __init__(
        self,
        catalog: Wants,
        files: FileCache,
        patcher: StopPatcher,
        following: Following,
        count: Callable[[str, int], None],
        stopping: threading.Event,
    ) -> None:
        self.catalog = catalog
        self.files = files
        self.patcher = patcher
        self.following = following
        self.count = count
        self.stopping = stopping
        self.holds: Holds | None = None  # set when the fanotify group exists
        # Seizing is quick and every held event needs it at once; what follows (the
        # stop, the engine) is CPU work that takes turns, so that a burst of seizes
        # never waits behind forty patches for the interpreter.
        self.turns = threading.BoundedSemaphore(PATCHING)

    def seize(self, held: Held, options: int, module: ModuleFile) -> bool:
        """Seize the event's thread (claimed). False (the event allowed, the thread not
        ours) if it is gone or traced by another."""
        assert self.holds is not None
        tid = held.tid
        try:
            ptrace.seize(tid, options)
        except OSError as e:
            self.holds.answer(held)
            if e.errno == errno.EPERM:
                tracer = 0
                with contextlib.suppress(ProcessError):
                    tracer = read_status(tid).tracer_pid
                self.count("skipped", 1)
                self.patcher.event(
                    "skipped", tid, module,
                    message=f"thread {tid} is traced by pid {tracer}: not patched"
                    if tracer else f"cannot trace thread {tid}: not patched",
                    data={"tracer": tracer},
                )  # fmt: skip
            return False
        return True

    def _same_build(self, held: Held, module: ModuleFile) -> bool:
        """Still the indexed build? (a file rewritten in place since it was indexed)"""
        current = self.files.of_fd(held.fd, module.path)
        if current.identity == module.identity:
            return True
        log.info("%s changed since it was indexed: not followed", module.path)
        return False

    def exec(self, held: Held, module: ModuleFile, follow: Follow) -> None:
        tid = held.tid
        try:
            with realtime(READER_PRIORITY):  # the event is held until this part is done
                tgid = self._take(held, module, PTRACE_O_TRACEEXEC | PTRACE_O_TRACESYSGOOD)
            if tgid is None:
                return
            tracee = tid
            try:
                with self.turns:
                    tracee = self._at_exec(tid, tgid, module, follow)
            except (StopTimeout, ProcessExited) as e:
                log.debug("thread %d at its exec: %s", tid, e)
            finally:
                self._unfollow(tid)  # before the detach: its next open is a new event
                let_go(tracee)
        finally:
            self._unfollow(tid)

    def _take(self, held: Held, module: ModuleFile, options: int) -> int | None:
        """Claim the event, seize its thread (interrupt it, for a load) and allow the
        event: the thread group's id, or None (the event allowed, the thread not ours)."""
        assert self.holds is not None
        tid = held.tid
        if not self.holds.claim(held):
            return None
        try:
            tgid = read_status(tid).tgid
        except ProcessError:
            self.holds.answer(held)
            return None
        if not self._same_build(held, module):
            self.holds.answer(held)
            return None
        if not self.seize(held, options, module):
            return None
        if held.exec:
            checkpoint("newproc-exec-held")
            self.holds.answer(held)
            return tgid
        try:
            ptrace.interrupt(tid)
        finally:
            self.holds.answer(held)
        return tgid

    def _at_exec(self, tid: int, tgid: int, module: ModuleFile, follow: Follow) -> int:
        """Wait for the exec event stop and patch there; returns the tracee's id then
        (a thread other than the leader that execs takes the leader's id)."""
        found = wait_exec(tid, tgid, EXEC_TIMEOUT, self.stopping)
        if found is None:
            return tid  # exited
        pid, stop = found
        if not stop.exec:
            self.count("exec_failed", 1)  # no exec within the timeout: it failed
            return pid
        checkpoint("newproc-exec-stopped")
        info = read_info(pid)
        work = [(module, self.catalog.wanted(info, module))]
        # ld.so, if watched, reported its open to this follow
        files = [f for f in self.following.files(follow).values() if f.inode != module.inode]
        names = mapped_names(pid)
        work += [(f, self.catalog.wanted(info, f)) for f in files if f.inode in names]
        work = [(m, w) for m, w in work if w]
        if not work:
            return pid
        exec_exit(pid, pid, FOLLOW_TIMEOUT)
        applied, failed = self.patcher.held(pid, [pid], info, work, "exec", names)
        self._tally(applied, failed, "patched_exec")
        return pid

    def load(self, held: Held, module: ModuleFile, follow: Follow) -> None:
        tid = held.tid
        try:
            with realtime(READER_PRIORITY):  # the event is held until this part is done
                if self._take(held, module, PTRACE_O_TRACESYSGOOD) is None:
                    return
            try:
                with self.turns:
                    self._follow_load(tid, follow)
            except (StopTimeout, ProcessExited, ProcessError) as e:
                self.count("not_loads", 1)
                log.debug("thread %d, followed: %s", tid, e)
            finally:
                self._unfollow(tid)  # before the detach: its next open is a new event
                let_go(tid)
        finally:
            self._unfollow(tid)

    def _follow_load(self, tid: int, follow: Follow) -> None:
        pid = read_status(tid).tgid

        def files() -> dict[Inode, ModuleFile]:
            return self.following.files(follow)

        mapped = follow_load(pid, tid, files, self.stopping)
        if not mapped:
            self.count("not_loads", 1)
            log.debug("thread %d opened a watched file without loading it", tid)
            return
        info = read_info(pid)
        known = files()
        work = [(known[i], self.catalog.wanted(info, known[i])) for i in mapped]
        work = [(m, w) for m, w in work if w]
        if work:
            applied, failed = self.patcher.held(pid, [tid], info, work, "load", mapped_names(pid))
            self._tally(applied, failed, "patched_load")

    def _tally(self, applied: int, failed: int, what: str) -> None:
        self.count("failed", failed)
        if applied:
            self.count(what, 1)

    def _unfollow(self, tid: int) -> None:
        self.following.end(tid)
