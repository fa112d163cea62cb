"""Following one traced thread from system call to system call.

For a tracer that holds a thread across an exec or a library load: which
system call a syscall stop is at (PTRACE_GET_SYSCALL_INFO), resuming to the
next stop while passing signals on, and moving an exec event stop on to the
execve's own exit stop, where registers written by the tracer stick (at the
exec event stop the kernel has yet to store execve's result in rax).
"""

from __future__ import annotations

import ctypes
import signal
from dataclasses import dataclass

from micropatch.errors import ProcessError, ProcessExited
from micropatch.process import ptrace
from micropatch.process.linux import (
    PTRACE_EVENT_EXEC,
    PTRACE_EVENT_STOP,
    PTRACE_GET_SYSCALL_INFO,
    PTRACE_SYSCALL,
    PTRACE_SYSCALL_INFO_ENTRY,
    PTRACE_SYSCALL_INFO_EXIT,
)
from micropatch.process.world import wait_stop

SYSCALL_STOP = signal.SIGTRAP | 0x80  # with PTRACE_O_TRACESYSGOOD


class _SyscallInfo(ctypes.Structure):
    # struct ptrace_syscall_info (include/uapi/linux/ptrace.h)
    _fields_ = [
        ("op", ctypes.c_uint8),
        ("pad", ctypes.c_uint8 * 3),
        ("arch", ctypes.c_uint32),
        ("instruction_pointer", ctypes.c_uint64),
        ("stack_pointer", ctypes.c_uint64),
        ("data", ctypes.c_uint64 * 8),  # entry: nr, args[6]; exit: rval, is_error
    ]


@dataclass(frozen=True)
class Stop:
    """One ptrace stop of a followed thread."""

    status: int  # signal | event << 8, as process.world.wait_stop returns it

    @property
    def signal(self) -> int:
        return self.status & 0xFF

    @property
    def event(self) -> int:
        return self.status >> 8

    @property
    def syscall(self) -> bool:
        return self.signal == SYSCALL_STOP

    @property
    def exec(self) -> bool:
        return self.event == PTRACE_EVENT_EXEC

    @property
    def delivered_signal(self) -> int:
        """The signal to pass on when resuming from this stop (0: none)."""
        if self.syscall or self.event or self.signal == signal.SIGTRAP:
            return 0
        return self.signal


@dataclass(frozen=True)
class SyscallInfo:
    entry: bool  # False: the exit stop
    nr: int  # at entry
    args: tuple[int, ...]  # at entry
    result: int  # at exit (negative errno on failure)


def syscall_info(tid: int) -> SyscallInfo | None:
    """Where a thread at a syscall stop is; None at any other kind of stop."""
    info = _SyscallInfo()
    ptrace.request(PTRACE_GET_SYSCALL_INFO, tid, ctypes.sizeof(info), ctypes.addressof(info))
    if info.op == PTRACE_SYSCALL_INFO_ENTRY:
        return SyscallInfo(True, info.data[0], tuple(info.data[1:7]), 0)
    if info.op == PTRACE_SYSCALL_INFO_EXIT:
        return SyscallInfo(False, -1, (), ctypes.c_int64(info.data[0]).value)
    return None


def next_stop(pid: int, tid: int, stop: Stop | None, timeout: float) -> Stop:
    """Resume tid with PTRACE_SYSCALL (passing on the signal of `stop`) until its
    next stop; ProcessExited if it exits, StopTimeout if it does not stop in time."""
    ptrace.request(PTRACE_SYSCALL, tid, 0, stop.delivered_signal if stop else 0)
    status = wait_stop(pid, tid, timeout)
    if status is None:
        raise ProcessExited(f"process {pid} exited while followed")
    return Stop(status)


def exec_exit(pid: int, tid: int, timeout: float) -> None:
    """From the exec event stop, go on to the execve's exit stop: the new image's
    first instruction is still to run, and registers set now are those it runs with."""
    stop = next_stop(pid, tid, None, timeout)
    if not stop.syscall:
        raise ProcessError(
            f"process {pid}: expected the exit of execve after its exec event, got stop "
            f"{stop.signal} (event {stop.event})"
        )


def is_group_stop(stop: Stop) -> bool:
    """A PTRACE_EVENT_STOP for SIGSTOP/SIGTSTP...: the thread wants to stay stopped."""
    return stop.event == PTRACE_EVENT_STOP and stop.signal != signal.SIGTRAP
