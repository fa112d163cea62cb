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
import threading
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TypeVar

from micropatch.arch.x86_64.abi import UserRegs
from micropatch.errors import (
    AlreadyTraced,
    MicropatchError,
    ProcessError,
    ProcessExited,
    ProcessNotFound,
    StopTimeout,
)
from micropatch.process import ptrace, restart, seized
from micropatch.process.linux import PTRACE_EVENT_STOP, WALL
from micropatch.process.memory import Memory
from micropatch.process.priority import realtime
from micropatch.process.procfs import (
    ProcessStatus,
    check_alive,
    list_threads,
    permission_denied,
    process_name,
    read_status,
)
from micropatch.process.watchdog import watched

log = logging.getLogger(__name__)

STOP_TIMEOUT = 2.0  # default seconds for every thread to stop (and for each single step)
LOOK_INTERVAL = 0.01  # how often a slow stop checks whether the thread is dying
# Between two looks at a thread that has not stopped yet we sleep, from FIRST_SLEEP
# doubling up to MAX_SLEEP: never a busy loop (see process/priority.py), and at most
# MAX_SLEEP of oversleep once the thread has stopped.
FIRST_SLEEP = 0.00002
MAX_SLEEP = 0.0005
# After the others are let go, how long a thread that never stopped gets to stop so that
# it can be detached (the kernel detaches only stopped tracees); see StoppedProcess.resume.
LET_GO_GRACE = 0.1
T = TypeVar("T")


@dataclass
class Thread:
    tid: int
    pending_signal: int = 0  # a signal we intercepted, given back on detach
    # Registers at stop time, then as the engine decided they resume (a move into a
    # relocated copy, a borrowed thread's continuation): written back before detach.
    saved_regs: UserRegs | None = None
    regs_dirty: bool = False
    stopped: bool = False  # seen in a ptrace stop: only then can it be detached
    # Its -EINTR from a blocking call was made a restart (process/restart.py);
    # saved_regs hold the restart code.
    restarted: bool = False


@dataclass
class StoppedProcess:
    """A process all of whose threads are in a ptrace stop."""

    pid: int
    status: ProcessStatus
    memory: Memory
    threads: dict[int, Thread] = field(default_factory=dict)
    timeout: float = STOP_TIMEOUT  # seconds a thread may take to stop
    writes: int = 0  # memory writes of the transactions in this stop (fault injection counts them)
    lone: bool = False  # one thread stopped (`lone_thread`), not the world
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

    def resume(self, keep: Collection[int] = ()) -> None:
        """Restore any registers we changed and let every thread go.

        `keep`: threads the caller held before the stop (`held_world`): their
        registers are restored too, but they stay in their ptrace stop, traced
        by the caller.

        A thread seized but never seen stopped (the stop timed out) cannot be
        detached until it stops: it gets LET_GO_GRACE, after the others are
        gone. Failing that it stays seized by this thread, and enters a ptrace
        stop whenever it leaves its sleep; the next stop_world from this thread
        takes it back (`_seize`), `seized.release()` lets it go once stopped, and
        this thread's exit lets it go.
        """
        stragglers = []
        for thread in self.threads.values():
            if not thread.stopped:
                stragglers.append(thread.tid)
                continue
            try:
                if thread.regs_dirty and thread.saved_regs is not None:
                    ptrace.set_regs(thread.tid, thread.saved_regs)
                if thread.tid not in keep:
                    ptrace.detach(thread.tid, thread.pending_signal)
            except OSError as e:
                if e.errno != errno.ESRCH:  # a thread that vanished needs no detach
                    raise
        self.resumed_at = time.perf_counter()
        for tid in stragglers:
            _let_go(self.pid, tid, min(self.timeout, LET_GO_GRACE))
        log.debug(
            "process %d: resumed %d threads after %.3f ms",
            self.pid,
            len(self.threads),
            (self.resumed_at - self.stopped_at) * 1e3,
        )
        self.threads.clear()
        self.memory.close()


def _let_go(pid: int, tid: int, grace: float) -> None:
    """Detach a thread that was seized and interrupted but had not stopped, if it stops
    within `grace` seconds."""
    try:
        stop = _wait_stop(pid, tid, time.monotonic() + grace, grace)
        if stop is not None:
            sig, event = stop & 0xFF, stop >> 8
            held = sig if event != PTRACE_EVENT_STOP and sig != signal.SIGTRAP else 0
            ptrace.detach(tid, held)
        return
    except (StopTimeout, ProcessExited):
        pass
    except OSError as e:
        if e.errno == errno.ESRCH:
            return
        raise
    seized.remember(pid, tid)
    log.warning(
        "process %d: thread %d never stopped; it stays seized by this thread (and stops "
        "when it wakes) until the next operation on the process, seized.release() or the "
        "end of this thread",
        pid,
        tid,
    )


def _checked(pid: int, op: Callable[[], T]) -> T:
    try:
        return op()
    except OSError as e:
        if e.errno == errno.ESRCH:
            raise ProcessExited(f"process {pid} exited during the operation") from None
        raise ProcessError(f"ptrace on process {pid} failed: {e.strerror}") from None


def _wait_stop(pid: int, tid: int, deadline: float, timeout: float) -> int | None:
    """Wait until tid stops; return its stop signal, or None if it exited.

    Polls with WNOHANG so a thread stuck in uninterruptible sleep cannot hang
    us (and every other stopped thread) forever; sleeps between polls, so a
    real-time patcher leaves the CPU to the threads it waits for. (A blocking
    waitpid has no timeout, and SIGCHLD cannot be relied on in a host process
    with other threads.)
    """
    delay = FIRST_SLEEP
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
            raise StopTimeout(
                f"thread {tid} of process {pid} did not stop within {timeout:g} s "
                f"(state {state}{': uninterruptible sleep, e.g. hung I/O' if state == 'D' else ''})"
                "; nothing was changed. Try again later, or allow longer with --stop-timeout",
                pid=pid,
            )
        time.sleep(delay)
        # Short sleeps first: a thread running on another CPU stops within microseconds;
        # one waiting for a CPU takes a time slice, and there a few hundred microseconds
        # of oversleep matter less than waking up, at real-time priority, for nothing.
        delay = min(delay * 2, MAX_SLEEP)


def wait_stop(pid: int, tid: int, timeout: float = STOP_TIMEOUT) -> int | None:
    """Wait until a thread we resumed stops again; its stop status (signal, and
    event in the high byte), or None if it exited."""
    return _wait_stop(pid, tid, time.monotonic() + timeout, timeout)


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
        if e.errno != errno.EPERM:
            raise ProcessError(
                f"cannot trace thread {tid} of process {pid}: {e.strerror}"
            ) from None
        if not _ours(tid):
            tracer = read_status(pid).tracer_pid if tid == pid else status.tracer_pid
            if tracer:
                raise AlreadyTraced(
                    f"process {pid} ({status.name}) is already traced by pid {tracer} "
                    f"({process_name(tracer)}): only one tracer at a time is possible; "
                    "detach the debugger or strace, then try again"
                ) from None
            raise permission_denied(pid, f"cannot trace process {pid} ({status.name})") from None
        # Seized by an earlier stop of ours in which it never stopped (see
        # StoppedProcess.resume): ours already; interrupt it again and wait for it.
        log.debug("process %d: thread %d still seized from an earlier stop", pid, tid)
    try:
        ptrace.interrupt(tid)
    except OSError as e:
        if e.errno == errno.ESRCH:
            return False
        raise
    return True


def _ours(tid: int) -> bool:
    """True if the calling thread is tid's tracer."""
    with contextlib.suppress(ProcessError):
        return read_status(tid).tracer_pid == threading.get_native_id()
    return False


def _stop_all(proc: StoppedProcess) -> None:
    pid = proc.pid
    fresh = [t for t in list_threads(pid) if t not in proc.threads]  # before the clock
    deadline = time.monotonic() + proc.timeout
    proc.stopped_at = proc.stopped_at or time.perf_counter()
    while fresh:
        seized = []
        for tid in fresh:
            if _seize(pid, tid, proc.status):
                proc.threads[tid] = Thread(tid)
                seized.append(tid)
        for tid in seized:
            _await(proc, tid, deadline)
        fresh = [t for t in list_threads(pid) if t not in proc.threads]
    if not proc.threads:
        raise ProcessExited(f"process {pid} exited during the operation")
    log.debug(
        "process %d: stopped %d threads in %.3f ms",
        pid,
        len(proc.threads),
        (time.perf_counter() - proc.stopped_at) * 1e3,
    )


def _restart_unseen(proc: StoppedProcess, tid: int) -> None:
    """If our interrupt ended a blocking call with an EINTR the kernel would not
    restart, and restarting it cannot be told apart, make the kernel restart it."""
    regs = proc.regs(tid)
    if not restart.candidate(regs):
        return
    try:
        if proc.memory.read(regs.rip - len(restart.SYSCALL_INSN), 2) != restart.SYSCALL_INSN:
            return
    except MicropatchError:
        return
    again = restart.restarted(regs)
    _checked(proc.pid, lambda: ptrace.set_regs(tid, again))
    thread = proc.threads[tid]
    thread.saved_regs, thread.restarted = again, True


def _await(proc: StoppedProcess, tid: int, deadline: float) -> None:
    """Wait for a seized and interrupted thread to stop; forget it if it exited."""
    stop = _wait_stop(proc.pid, tid, deadline, proc.timeout)
    if stop is None:
        del proc.threads[tid]
        return
    sig, event = stop & 0xFF, stop >> 8
    if event != PTRACE_EVENT_STOP and sig != signal.SIGTRAP:
        # A signal arrived before our interrupt: hold it, deliver it on detach.
        proc.threads[tid].pending_signal = sig
    proc.threads[tid].stopped = True
    if event == PTRACE_EVENT_STOP:
        _restart_unseen(proc, tid)


@contextmanager
def stop_world(pid: int, *, timeout: float = STOP_TIMEOUT) -> Iterator[StoppedProcess]:
    """Stop every thread of pid; resume them all when the block ends, whatever happens.

    `timeout`: seconds every thread may take to stop (StopTimeout otherwise,
    with the process untouched), and each single step inside the block. From
    the first seize to the last detach the calling thread runs at real-time
    priority where permitted (`process.priority.realtime`), so that a busy
    machine does not stretch the stop.
    """
    proc = _new(pid, timeout)
    with watched(pid, f"the stop of process {pid} ({proc.status.name})", timeout), realtime():
        try:
            _stop_all(proc)
            yield proc
        finally:
            proc.resume()


@contextmanager
def lone_thread(pid: int, *, timeout: float = STOP_TIMEOUT) -> Iterator[StoppedProcess]:
    """Stop one thread of pid, the main one unless it has exited, and let every other
    thread run on: enough to borrow it for system calls whose effects no other thread
    can reach yet (mapping a cave nothing jumps to). Never enough to write code that
    runs: that needs `stop_world`. Same priority and resume as `stop_world`."""
    proc = _new(pid, timeout)
    proc.lone = True
    what = f"the stop of a thread of process {pid} ({proc.status.name})"
    with watched(pid, what, timeout), realtime():
        try:
            proc.stopped_at = time.perf_counter()
            tid = next((t for t in list_threads(pid) if not _exited(t)), None)
            if tid is None or not _seize(pid, tid, proc.status):
                raise ProcessExited(f"process {pid} exited during the operation")
            proc.threads[tid] = Thread(tid)
            _await(proc, tid, time.monotonic() + timeout)
            if not proc.threads:
                raise ProcessExited(f"process {pid} exited during the operation")
            yield proc
        finally:
            proc.resume()


def _new(pid: int, timeout: float) -> StoppedProcess:
    if timeout <= 0:
        raise ValueError(f"stop timeout must be positive, not {timeout}")
    status = check_alive(pid)
    if status.tracer_pid and status.tracer_pid != threading.get_native_id():
        raise AlreadyTraced(
            f"process {pid} ({status.name}) is already traced by pid {status.tracer_pid} "
            f"({process_name(status.tracer_pid)}): only one tracer at a time is possible; "
            "detach the debugger or strace, then try again"
        )
    return StoppedProcess(pid=pid, status=status, memory=Memory(pid), timeout=timeout)


def _exited(tid: int) -> bool:
    """A thread that is gone or a zombie (a main thread that called pthread_exit)."""
    try:
        return read_status(tid).zombie
    except ProcessError:
        return True


@contextmanager
def held_world(
    pid: int, held: Collection[int], *, timeout: float = STOP_TIMEOUT
) -> Iterator[StoppedProcess]:
    """Like `stop_world`, for a caller whose own thread already traces some threads of
    pid and holds them in a ptrace stop (an exec event stop, a system call exit stop).

    The held threads are adopted as they are: a PTRACE_INTERRUPT would give a
    stopped tracee no new stop to wait for. Every other thread is seized and
    interrupted as `stop_world` does. When the block ends the threads this
    function seized are let go; the held ones get back the registers the block
    decided (a remote system call's continuation) and stay stopped and traced
    by the caller, who goes on following them or detaches them.

    A held thread must not be at a system call *entry* stop: its registers
    would not say how to resume it (see `process.syscall.continuation`); an
    exec event stop is moved on to the execve's exit stop first (`exec_exit`).
    """
    if timeout <= 0:
        raise ValueError(f"stop timeout must be positive, not {timeout}")
    status = check_alive(pid)
    proc = StoppedProcess(pid=pid, status=status, memory=Memory(pid), timeout=timeout)
    proc.stopped_at = time.perf_counter()
    for tid in held:
        proc.threads[tid] = Thread(tid, stopped=True)
    with watched(pid, f"the stop of process {pid} ({status.name})", timeout), realtime():
        try:
            _stop_all(proc)
            yield proc
        finally:
            proc.resume(keep=held)


def exists(pid: int) -> bool:
    try:
        check_alive(pid)
    except (ProcessNotFound, ProcessExited):
        return False
    return True
