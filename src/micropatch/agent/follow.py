"""Following a seized thread to the stop where its patches can be applied.

- An exec: `wait_exec` lets the thread run to its exec event stop (only the
  executable and ld.so mapped, not one instruction of the program run).
- A library load: `follow_load` follows the opening thread from system call to
  system call (`PTRACE_SYSCALL`, `PTRACE_GET_SYSCALL_INFO`) until the file's
  executable segment is mapped and the loader closes the descriptor, and leaves
  it at that system call's exit stop: ld.so has not relocated the library nor
  run its initialisers, and `dlopen` has not returned.

`let_go` detaches a tracee whatever stop it is in. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import time
from collections.abc import Callable

from micropatch.agent.files import ModuleFile
from micropatch.arch.x86_64.abi import SYS_CLOSE, SYS_MMAP, SYS_OPENS
from micropatch.errors import ProcessError, ProcessExited, StopTimeout
from micropatch.faults import checkpoint
from micropatch.process import ptrace
from micropatch.process.linux import WALL
from micropatch.process.maps import read_maps
from micropatch.process.tracing import Stop, is_group_stop, next_stop, syscall_info
from micropatch.process.world import wait_stop

Inode = tuple[int, int]

FOLLOW_TIMEOUT = 2.0  # seconds a followed thread may take between two system calls
MAX_FOLLOWED_SYSCALLS = 256  # a loader maps a library within a few dozen
AFTER_MAPPED_SYSCALLS = 16  # patch anyway if the file is not closed this soon after


def wait_exec(
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


def follow_load(
    pid: int,
    tid: int,
    files: Callable[[], dict[Inode, ModuleFile]],
    stopping: threading.Event,
) -> set[Inode]:
    """Follow a seized and interrupted thread that opened watched files (`files()`:
    those known now, more may be added while it is followed) until one is mapped
    executable and closed (or AFTER_MAPPED_SYSCALLS later). Returns the inodes
    mapped, the thread then held at a system call exit stop; an empty set if it
    was not a load (a `cp`, a checksum): the caller lets it go.
    StopTimeout / ProcessExited pass."""
    before = executable_inodes(pid)
    stop: Stop | None = Stop(_must_stop(pid, tid))  # the interrupt, once open() returned
    checkpoint("newproc-load-following")
    opened = -1
    regs = ptrace.get_regs(tid)
    if regs.orig_rax in SYS_OPENS:  # the open returned the descriptor
        opened = regs.rax
        if opened >= 1 << 63:  # the open failed after all: nothing to load
            return set()
    mapped: set[Inode] = set()
    since_mapped = 0
    entry_nr = -1
    entry_args: tuple[int, ...] = ()
    for _ in range(MAX_FOLLOWED_SYSCALLS):
        if stopping.is_set():
            return set()
        stop = next_stop(pid, tid, stop, FOLLOW_TIMEOUT)
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
        if entry_nr == SYS_MMAP and info.result >= 0:
            watched = files()
            now = executable_inodes(pid)
            mapped |= {inode for inode in watched if inode in now and inode not in before}
        closed = entry_nr == SYS_CLOSE and bool(entry_args) and entry_args[0] == opened
        if mapped and (closed or since_mapped >= AFTER_MAPPED_SYSCALLS):
            return mapped
        if closed:
            break
    return set()


def _must_stop(pid: int, tid: int) -> int:
    status = wait_stop(pid, tid, FOLLOW_TIMEOUT)
    if status is None:
        raise ProcessError(f"process {pid} exited while followed")
    return status


def _wait(tid: int, timeout: float) -> int | None:
    """A stop status, None if tid exited, -1 if it did not stop within timeout."""
    try:
        return wait_stop(tid, tid, timeout)
    except StopTimeout:
        return -1
    except ProcessExited:
        return None


def let_go(tid: int) -> None:
    """Detach a tracee whatever stop it is in (interrupting it first if it runs)."""
    try:
        ptrace.detach(tid)
        return
    except OSError as e:
        if e.errno == errno.ESRCH and not os.path.exists(f"/proc/{tid}"):
            return
    with contextlib.suppress(OSError):
        ptrace.interrupt(tid)
        _wait(tid, FOLLOW_TIMEOUT)
    with contextlib.suppress(OSError):
        ptrace.detach(tid)


def executable_inodes(pid: int) -> set[Inode]:
    """(dev, ino) of every file pid maps executable."""
    return set(mapped_names(pid))


def mapped_names(pid: int) -> dict[Inode, str]:
    """(dev, ino) of every file pid maps executable, and the file's name there (the
    name a patch's target must have for the engine to find it)."""
    found: dict[Inode, str] = {}
    for m in read_maps(pid):
        if m.inode and m.executable:
            major, minor = (int(x, 16) for x in m.dev.split(":"))
            found.setdefault((os.makedev(major, minor), m.inode), m.name)
    return found
