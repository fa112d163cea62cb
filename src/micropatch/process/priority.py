"""Real-time priority for the patcher while a target is stopped.

While every thread of a target is stopped, each millisecond the patcher waits
for a CPU is a millisecond the target stays stopped. On a loaded machine a
SCHED_OTHER patcher shares the CPUs with every busy process at its nice level
and is preempted mid-stop; as SCHED_FIFO it runs whenever it is runnable.

The rule that makes this safe: the patcher must never spin while real-time.
A FIFO thread that polls without blocking keeps its CPU from every normal
thread, including the target threads it is waiting for (on a two-core machine,
half of all CPU). Every wait inside the stop therefore sleeps in the kernel
(`process.world._wait_stop`); `sched_yield` would not do, as it yields only to
real-time threads of the same priority.

The kernel's real-time throttling (`/proc/sys/kernel/sched_rt_runtime_us`,
950 ms per second by default; the fair-server reservation on newer kernels)
caps real-time threads per second of CPU: a stop window of milliseconds is
far inside it, and the cap is a backstop should a bug ever make us spin.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

# Above ordinary real-time work that defaults to 1 (e.g. `chrt -f` without a
# priority is rejected; tools commonly pick 1-10) and well below the kernel's
# own threads and the watchdogs (49-99), which must keep preempting us.
STOP_PRIORITY = 10


@contextmanager
def realtime(priority: int = STOP_PRIORITY) -> Iterator[bool]:
    """Run the block with the calling thread at SCHED_FIFO `priority`, when permitted.

    Yields True if the priority was raised. Without the right to (neither root
    nor CAP_SYS_NICE, an RLIMIT_RTPRIO too low, a container that forbids it)
    the block runs at the thread's own priority; the reason is logged at debug
    level. A thread already real-time at `priority` or higher is left as it is.
    The previous policy and priority (and the nice value, which the kernel
    keeps) are restored when the block ends, whatever happens in it.
    """
    try:
        policy = os.sched_getscheduler(0)
        param = os.sched_getparam(0)
    except OSError as e:  # pragma: no cover - Linux always answers for the caller
        log.debug("scheduling policy unknown (%s): priority not raised", e)
        yield False
        return
    base = policy & ~os.SCHED_RESET_ON_FORK
    if base in (os.SCHED_FIFO, os.SCHED_RR) and param.sched_priority >= priority:
        yield True
        return
    if base not in (os.SCHED_OTHER, os.SCHED_BATCH, os.SCHED_IDLE, os.SCHED_FIFO, os.SCHED_RR):
        log.debug("scheduling policy %d (deadline?) left as it is", policy)
        yield False
        return
    try:
        # RESET_ON_FORK: a process forked inside the window (none is, today)
        # must not inherit real-time priority.
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
    except (OSError, ValueError) as e:
        log.debug("SCHED_FIFO %d not permitted (%s): stop window at normal priority", priority, e)
        yield False
        return
    try:
        yield True
    finally:
        _restore(policy, param)


def _restore(policy: int, param: os.sched_param) -> None:
    try:
        os.sched_setscheduler(0, policy, param)
    except PermissionError:
        # Only CAP_SYS_NICE may clear RESET_ON_FORK; a thread raised through
        # RLIMIT_RTPRIO alone keeps the flag, harmless at a normal priority.
        os.sched_setscheduler(0, policy | os.SCHED_RESET_ON_FORK, param)


def realtime_refused(priority: int = STOP_PRIORITY) -> str | None:
    """Why this thread may not run at SCHED_FIFO `priority` (None: it may). Tries it
    and goes back at once: for a daemon to say so at start, not at its first stop."""
    try:
        with _probe(priority):
            return None
    except OSError as e:
        return e.strerror or str(e)


@contextmanager
def _probe(priority: int) -> Iterator[None]:
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
    try:
        yield
    finally:
        _restore(policy, param)
