"""Stop-the-world: every thread of a process under ptrace, or none.

Threads are seized and interrupted, then /proc/PID/task is read again until
no new thread shows up: once every known thread is stopped, none can create
another, so a stable rescan means the whole process is stopped.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from micropatch.arch.x86_64.abi import UserRegs
from micropatch.errors import AlreadyTraced, ProcessError, ProcessExited, ProcessNotFound
from micropatch.process import ptrace
from micropatch.process.linux import PTRACE_EVENT_STOP, WALL
from micropatch.process.memory import Memory
from micropatch.process.procfs import (
    ProcessStatus,
    check_alive,
    list_threads,
    permission_denied,
    process_name,
    read_status,
)

log = logging.getLogger(__name__)

STOP_TIMEOUT = 2.0
LOOK_INTERVAL = 0.01  # how often a slow stop checks whether the thread is dying
T = TypeVar("T")


@dataclass
class Thread:
    tid: int
    pending_signal: int = 0  # a signal we intercepted, given back on detach
    saved_regs: UserRegs | None = None  # registers at stop time, restored before detach
    regs_dirty: bool = False


@dataclass
class StoppedProcess:
    """A process all of whose threads are in a ptrace stop."""

    pid: int
    status: ProcessStatus
    memory: Memory
    threads: dict[int, Thread] = field(default_factory=dict)
    stopped_at: float = 0.0  # perf_counter() just before the first thread was seized
    resumed_at: float = 0.0  # perf_counter() just after the last one was let go

    @property
    def paused(self) -> float:
        """Seconds from the first seize to the last detach: what the target felt."""
        return self.resumed_at - self.stopped_at

    def regs(self, tid: int) -> UserRegs:
        """Registers of a thread as they were when it stopped."""
        thread = self.threads[tid]
        if thread.saved_regs is None:
            thread.saved_regs = _checked(self.pid, lambda: ptrace.get_regs(tid))
        return thread.saved_regs

    def set_regs(self, tid: int, regs: UserRegs) -> None:
        self.regs(tid)  # keep the original for restoring
        self.threads[tid].regs_dirty = True
        _checked(self.pid, lambda: ptrace.set_regs(tid, regs))

    def resume(self) -> None:
        """Restore any registers we changed and let every thread go."""
        for thread in self.threads.values():
            try:
                if thread.regs_dirty and thread.saved_regs is not None:
                    ptrace.set_regs(thread.tid, thread.saved_regs)
                ptrace.detach(thread.tid, thread.pending_signal)
            except OSError as e:
                if e.errno != errno.ESRCH:  # a thread that vanished needs no detach
                    raise
        log.debug(
            "process %d: resumed %d threads after %.3f ms",
            self.pid,
            len(self.threads),
            (time.perf_counter() - self.stopped_at) * 1e3,
        )
        self.threads.clear()
        self.resumed_at = time.perf_counter()
        self.memory.close()


def _checked(pid: int, op: Callable[[], T]) -> T:
    try:
        return op()
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise ProcessExited(f"process {pid} exited during the operation") from None
        raise ProcessError(f"ptrace on process {pid} failed: {e.strerror}") from None


def _wait_stop(pid: int, tid: int, deadline: float) -> int | None:
    """Wait until tid stops; return its stop signal, or None if it exited.

    Polls with WNOHANG so a thread stuck in uninterruptible sleep cannot hang
    us (and every other stopped thread) forever.
    """
    delay = 0.00002
    next_look = time.monotonic() + LOOK_INTERVAL
    while True:
        try:
            waited, status = os.waitpid(tid, os.WNOHANG | WALL)
        except ChildProcessError:
            return None
        if waited == tid:
            if os.WIFSTOPPED(status):
                return os.WSTOPSIG(status) | ((status >> 16) << 8)
            return None  # exited or killed
        now = time.monotonic()
        if now > next_look:
            # A thread that is exiting never enters a ptrace stop: do not wait for it.
            next_look = now + LOOK_INTERVAL
            if _dying(pid, tid):
                raise ProcessExited(f"process {pid} exited during the operation")
        if now > deadline:
            state = "?"
            with contextlib.suppress(ProcessError):
                state = read_status(tid).state
            raise ProcessError(
                f"thread {tid} of process {pid} did not stop within {STOP_TIMEOUT:.0f} s "
                f"(state {state}{': uninterruptible sleep, e.g. hung I/O' if state == 'D' else ''})"
                "; nothing was changed, try again later"
            )
        time.sleep(delay)
        # Short polls: a runnable thread on a busy CPU stops within a time slice,
        # and every millisecond we oversleep is a millisecond the others stay stopped.
        delay = min(delay * 2, 0.0002)


def wait_stop(pid: int, tid: int, timeout: float = STOP_TIMEOUT) -> int | None:
    """Wait until a thread we resumed stops again; its stop status (signal, and
    event in the high byte), or None if it exited."""
    return _wait_stop(pid, tid, time.monotonic() + timeout)


def _dying(pid: int, tid: int) -> bool:
    """True if the process or this thread is gone, a zombie, or being killed."""
    try:
        if read_status(pid).zombie or read_status(tid).zombie:
            return True
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            pending = next((line for line in f if line.startswith("ShdPnd:")), "ShdPnd: 0")
    except (ProcessError, OSError):
        return True
    return bool(int(pending.split()[1], 16) & (1 << (signal.SIGKILL - 1)))


def _seize(pid: int, tid: int, status: ProcessStatus) -> bool:
    """Seize and interrupt one thread; False if it vanished first."""
    try:
        ptrace.seize(tid)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return False
        if e.errno == errno.EPERM:
            tracer = read_status(pid).tracer_pid if tid == pid else status.tracer_pid
            if tracer:
                raise AlreadyTraced(
                    f"process {pid} ({status.name}) is already traced by pid {tracer} "
                    f"({process_name(tracer)}): only one tracer at a time is possible; "
                    "detach the debugger or strace, then try again"
                ) from None
            raise permission_denied(pid, f"cannot trace process {pid} ({status.name})") from None
        raise ProcessError(f"cannot trace thread {tid} of process {pid}: {e.strerror}") from None
    try:
        ptrace.interrupt(tid)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return False
        raise
    return True


def _stop_all(proc: StoppedProcess) -> None:
    pid = proc.pid
    deadline = time.monotonic() + STOP_TIMEOUT
    proc.stopped_at = time.perf_counter()
    while True:
        fresh = [t for t in list_threads(pid) if t not in proc.threads]
        if not fresh:
            break
        seized = []
        for tid in fresh:
            if _seize(pid, tid, proc.status):
                proc.threads[tid] = Thread(tid)
                seized.append(tid)
        for tid in seized:
            stop = _wait_stop(pid, tid, deadline)
            if stop is None:
                del proc.threads[tid]
                continue
            sig, event = stop & 0xFF, stop >> 8
            if event != PTRACE_EVENT_STOP and sig != signal.SIGTRAP:
                # A signal arrived before our interrupt: hold it, deliver it on detach.
                proc.threads[tid].pending_signal = sig
    if not proc.threads:
        raise ProcessExited(f"process {pid} exited during the operation")
    log.debug(
        "process %d: stopped %d threads in %.3f ms",
        pid,
        len(proc.threads),
        (time.perf_counter() - proc.stopped_at) * 1e3,
    )


@contextmanager
def stop_world(pid: int) -> Iterator[StoppedProcess]:
    """Stop every thread of pid; resume them all when the block ends, whatever happens."""
    status = check_alive(pid)
    if status.tracer_pid:
        raise AlreadyTraced(
            f"process {pid} ({status.name}) is already traced by pid {status.tracer_pid} "
            f"({process_name(status.tracer_pid)}): only one tracer at a time is possible; "
            "detach the debugger or strace, then try again"
        )
    proc = StoppedProcess(pid=pid, status=status, memory=Memory(pid))
    try:
        _stop_all(proc)
        yield proc
    finally:
        proc.resume()


def exists(pid: int) -> bool:
    try:
        check_alive(pid)
    except (ProcessNotFound, ProcessExited):
        return False
    return True
