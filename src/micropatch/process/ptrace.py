"""Thin ctypes binding of ptrace(2): raises OSError with the kernel's errno."""

from __future__ import annotations

import ctypes
import os
import signal

from micropatch.arch.x86_64.abi import UserRegs
from micropatch.process.linux import (
    PTRACE_CONT,
    PTRACE_DETACH,
    PTRACE_GETEVENTMSG,
    PTRACE_GETREGS,
    PTRACE_INTERRUPT,
    PTRACE_SEIZE,
    PTRACE_SETOPTIONS,
    PTRACE_SETREGS,
    PTRACE_SINGLESTEP,
    PTRACE_TRACEME,
)

# The libc this interpreter runs with, by its handle (dlopen(NULL)): no search for it,
# which `ctypes.util.find_library` does by running `ldconfig -p` in a child process.
# CDLL, not PyDLL: the interpreter lock is let go during each call. Holding it would
# save a little CPU per stop (another thread may take the lock between requests), but
# PTRACE_SEIZE waits for the target's cred_guard_mutex, which a thread inside execve
# holds — on kernels before 6.8 also while fanotify holds its exec open for the agent.
# With the lock held there, the agent's reader and hold watchdog could never run to
# allow that open: the agent, the exec and every held open would wait forever.
_libc = ctypes.CDLL(None, use_errno=True)
_ptrace = _libc.ptrace
_ptrace.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
_ptrace.restype = ctypes.c_long


def _call(request: int, tid: int, addr: int | None = None, data: object = None) -> int:
    ctypes.set_errno(0)
    result: int = _ptrace(request, tid, addr, data)
    if result == -1:
        err = ctypes.get_errno()
        if err:
            raise OSError(err, os.strerror(err))
    return result


def seize(tid: int, options: int = 0) -> None:
    """PTRACE_SEIZE, with PTRACE_O_* options set at once (no window without them)."""
    _call(PTRACE_SEIZE, tid, 0, options)


def interrupt(tid: int) -> None:
    _call(PTRACE_INTERRUPT, tid, 0, 0)


def detach(tid: int, signal: int = 0) -> None:
    _call(PTRACE_DETACH, tid, 0, signal)


def singlestep(tid: int) -> None:
    _call(PTRACE_SINGLESTEP, tid, 0, 0)


def get_regs(tid: int) -> UserRegs:
    regs = UserRegs()
    _call(PTRACE_GETREGS, tid, 0, ctypes.addressof(regs))
    return regs


def set_regs(tid: int, regs: UserRegs) -> None:
    _call(PTRACE_SETREGS, tid, 0, ctypes.addressof(regs))


def request(request: int, tid: int, addr: int, data: int) -> int:
    """Any other request, for the rare callers that need one (seccomp filters)."""
    return _call(request, tid, addr, data)


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills us when our parent exits."""
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def traceme() -> None:
    """In a freshly forked child: make the parent its tracer (stops at the next exec)."""
    _call(PTRACE_TRACEME, 0, 0, 0)


def cont(tid: int, signal: int = 0) -> None:
    _call(PTRACE_CONT, tid, 0, signal)


def set_options(tid: int, options: int) -> None:
    _call(PTRACE_SETOPTIONS, tid, 0, options)


def event_message(tid: int) -> int:
    """PTRACE_GETEVENTMSG: e.g. the new thread's id at a PTRACE_EVENT_CLONE stop."""
    value = ctypes.c_ulong(0)
    _call(PTRACE_GETEVENTMSG, tid, 0, ctypes.addressof(value))
    return value.value
