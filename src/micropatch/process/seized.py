"""Threads a stop seized but could not let go, and who may let them go.

A thread in killable sleep (a vfork parent, hung I/O) or starved of a CPU past
the stop timeout is seized and interrupted but never seen stopped; the kernel
detaches only stopped tracees, so `StoppedProcess.resume` leaves it seized. It
enters a ptrace stop when it next wakes, and stays there until its tracer acts.
The tracer is a *thread*: only the thread that seized it may detach it, and that
thread's exit detaches it (the kernel's exit_ptrace). A short-lived command
(the CLI) exits anyway; a long-lived caller (the agent's workers) calls
`release()` after each operation and, while it reports threads still held,
ends the thread that holds them instead of keeping them stopped.

The record is per thread (`threading.local`) because the kernel's is.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

from micropatch.process import ptrace
from micropatch.process.linux import PTRACE_EVENT_STOP, WALL

log = logging.getLogger(__name__)


class _Held(threading.local):
    def __init__(self) -> None:
        self.tids: dict[int, int] = {}  # tid -> pid


_HELD = _Held()


def remember(pid: int, tid: int) -> None:
    """Thread `tid` of `pid` stays seized by the calling thread."""
    _HELD.tids[tid] = pid


def release() -> int:
    """Let go every thread the calling thread still holds that has stopped since;
    how many it still holds (not stopped yet)."""
    held = _HELD.tids
    for tid, pid in list(held.items()):
        try:
            waited, status = os.waitpid(tid, os.WNOHANG | WALL)
        except ChildProcessError:  # gone, or taken back and let go by a later stop
            del held[tid]
            continue
        if waited != tid:
            continue
        del held[tid]
        if os.WIFSTOPPED(status):
            sig, event = os.WSTOPSIG(status), status >> 16
            given = sig if event != PTRACE_EVENT_STOP and sig != signal.SIGTRAP else 0
            with contextlib.suppress(OSError):
                ptrace.detach(tid, given)
            log.info("process %d: thread %d stopped at last and was let go", pid, tid)
    return len(held)
