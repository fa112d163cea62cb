"""Spawning a program under ptrace: stopped before its first instruction,
breakpoints, the auxiliary vector and the dynamic linker's debug hook.

The program is our child and our tracee (PTRACE_TRACEME, then exec). Before
anyone else (the live engine, which seizes processes itself) can trace it we
hand it over: `handover` detaches every thread so that the process lands in
a group stop (SIGSTOP), from which a later SIGCONT resumes it.

Waiting uses waitpid(-1, __WALL): the caller's only children must be the
program's threads while `Launched.run_until` is running (true in the CLI).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from micropatch.arch.x86_64.abi import SYS_TGKILL
from micropatch.arch.x86_64.constants import INT3
from micropatch.errors import ProcessError
from micropatch.process import ptrace
from micropatch.process.linux import (
    AT_ENTRY,
    AT_NULL,
    AT_PHDR,
    AT_PHNUM,
    DT_DEBUG,
    DT_NULL,
    PT_DYNAMIC,
    PT_PHDR,
    PTRACE_EVENT_CLONE,
    PTRACE_EVENT_EXEC,
    PTRACE_O_EXITKILL,
    PTRACE_O_TRACECLONE,
    PTRACE_O_TRACEEXEC,
    WALL,
)
from micropatch.process.memory import Memory
from micropatch.process.procfs import list_threads, read_status

HANDOVER_TIMEOUT = 5.0
R_DEBUG_R_BRK = 16  # offsetof(struct r_debug, r_brk) on x86-64


@dataclass(frozen=True)
class Exit:
    """How the program ended: an exit code, or the signal that killed it."""

    code: int | None
    signal: int | None

    @property
    def status(self) -> int:
        """A shell's view: the exit code, or 128 + the signal number."""
        return self.code if self.code is not None else 128 + (self.signal or 0)

    @staticmethod
    def of(status: int) -> Exit:
        if os.WIFSIGNALED(status):
            return Exit(None, os.WTERMSIG(status))
        return Exit(os.WEXITSTATUS(status), None)


def read_auxv(pid: int) -> dict[int, int]:
    try:
        with open(f"/proc/{pid}/auxv", "rb") as f:
            data = f.read()
    except OSError as e:
        raise ProcessError(f"cannot read /proc/{pid}/auxv: {e.strerror}") from None
    entries: dict[int, int] = {}
    for kind, value in struct.iter_unpack("<QQ", data[: len(data) // 16 * 16]):
        if kind == AT_NULL:
            break
        entries[kind] = value
    return entries


@dataclass
class Breakpoint:
    address: int
    original: bytes = b""

    def arm(self, memory: Memory) -> None:
        self.original = memory.read(self.address, 1)
        memory.write(self.address, INT3)

    def disarm(self, memory: Memory) -> None:
        if self.original:
            memory.write(self.address, self.original)


@dataclass
class Launched:
    """A program we spawned and trace, thread by thread, until `handover`."""

    pid: int
    opened: Memory | None
    threads: set[int] = field(default_factory=set)
    exit: Exit | None = None
    execed: bool = False  # run_until stopped because the program exec'd another one

    @property
    def memory(self) -> Memory:
        if self.opened is None:
            raise ProcessError(f"process {self.pid} is not traced")
        return self.opened

    def _close(self) -> None:
        if self.opened is not None:
            self.opened.close()
            self.opened = None

    # --- stopping points -----------------------------------------------------

    def entry(self) -> int:
        return read_auxv(self.pid)[AT_ENTRY]

    def debug_hook(self) -> int:
        """r_debug.r_brk: the function the dynamic linker calls around every
        change of the loaded-object list (dlopen, dlclose); found through the
        executable's DT_DEBUG entry, which ld.so has filled in by entry time."""
        auxv = read_auxv(self.pid)
        phdr, phnum = auxv[AT_PHDR], auxv[AT_PHNUM]
        headers = [
            struct.unpack("<IIQQQQQQ", self.memory.read(phdr + i * 56, 56)) for i in range(phnum)
        ]
        bias = next((phdr - h[3] for h in headers if h[0] == PT_PHDR), None)
        dynamic = next((h[3] for h in headers if h[0] == PT_DYNAMIC), None)
        if bias is None or dynamic is None:
            raise ProcessError(
                f"process {self.pid}: the executable has no PT_PHDR or PT_DYNAMIC header "
                "(statically linked?): libraries loaded later cannot be watched"
            )
        at = dynamic + bias
        while True:
            tag, value = struct.unpack("<qQ", self.memory.read(at, 16))
            if tag == DT_NULL:
                raise ProcessError(
                    f"process {self.pid}: the executable has no DT_DEBUG entry: "
                    "libraries loaded later cannot be watched"
                )
            if tag == DT_DEBUG:
                if not value:
                    raise ProcessError(f"process {self.pid}: DT_DEBUG not filled in by ld.so")
                (r_brk,) = struct.unpack("<Q", self.memory.read(value + R_DEBUG_R_BRK, 8))
                return int(r_brk)
            at += 16

    # --- running ---------------------------------------------------------------

    def run_until(self, bp: Breakpoint, done: Callable[[], bool]) -> int | None:
        """Run with an int3 at bp.address until a thread hits it and done() is
        true after the hit; returns that thread with the breakpoint removed and
        the thread back at bp.address, every other thread running; None if the
        program ended first (self.exit). If the program executes another
        program, returns its (only) thread stopped after the exec, with
        self.execed set: the breakpoint went with the old address space."""
        self.execed = False
        bp.arm(self.memory)
        for tid in self.threads:
            ptrace.cont(tid)
        while True:
            try:
                tid, status = os.waitpid(-1, WALL)
            except ChildProcessError:
                self.exit = self.exit or Exit(None, None)
                return None
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self.threads.discard(tid)
                if tid == self.pid:
                    self.exit = Exit.of(status)
                    return None
                continue
            sig, event = os.WSTOPSIG(status), status >> 16
            if tid not in self.threads:  # a new thread's first stop
                self.threads.add(tid)
                self._cont(tid, 0)
                continue
            if event == PTRACE_EVENT_CLONE:
                self.threads.add(ptrace.event_message(tid))
                self._cont(tid, 0)
                continue
            if event == PTRACE_EVENT_EXEC:  # the other threads are gone; tid is now pid
                self.threads = {self.pid}
                self._close()
                self.opened = Memory(self.pid)
                self.execed = True
                return self.pid
            if sig == signal.SIGTRAP and event == 0 and self._at_breakpoint(tid, bp):
                bp.disarm(self.memory)
                if done():
                    return tid
                self._step(tid)
                bp.arm(self.memory)
                self._cont(tid, 0)
                continue
            self._cont(tid, 0 if sig == signal.SIGTRAP and event else sig)

    def _at_breakpoint(self, tid: int, bp: Breakpoint) -> bool:
        regs = ptrace.get_regs(tid)
        if regs.rip - 1 != bp.address:
            return False
        regs.rip = bp.address
        ptrace.set_regs(tid, regs)
        return True

    def _cont(self, tid: int, sig: int) -> None:
        try:
            ptrace.cont(tid, sig)
        except OSError as e:
            if e.errno != errno.ESRCH:
                raise

    def _step(self, tid: int) -> None:
        ptrace.singlestep(tid)
        _, status = os.waitpid(tid, WALL)
        if not os.WIFSTOPPED(status):
            self.threads.discard(tid)

    # --- handing over --------------------------------------------------------------

    def handover(self, stopped: int, breakpoint_at: int | None = None) -> None:
        """Detach every thread, leaving the whole process in a group stop.

        `stopped` is a thread in a ptrace stop; the others may be running. Each
        other thread is first brought into a ptrace stop of its own (a SIGSTOP
        sent to it: other signals it reports meanwhile are delivered, a hit on
        the already removed int3 at `breakpoint_at` is rewound); then all are
        detached with SIGSTOP, so that each one stops again in the group stop.
        """
        pending = set(self.threads) - {stopped}
        for tid in pending:
            _tgkill(self.pid, tid, signal.SIGSTOP)
        held = [stopped]
        while pending:
            tid = pending.pop()
            if self._hold(tid, breakpoint_at, pending):
                held.append(tid)
        for tid in held:  # `stopped` first: it starts the group stop
            with contextlib.suppress(ProcessLookupError):
                ptrace.detach(tid, signal.SIGSTOP)
        self.threads.clear()
        self._close()
        _wait_group_stop(self.pid)

    def _hold(self, tid: int, breakpoint_at: int | None, pending: set[int]) -> bool:
        """Wait until tid reports a SIGSTOP; False if it exited first."""
        while True:
            try:
                _, status = os.waitpid(tid, WALL)
            except ChildProcessError:
                return False
            if not os.WIFSTOPPED(status):
                return False
            sig, event = os.WSTOPSIG(status), status >> 16
            if sig == signal.SIGSTOP and event == 0:
                return True
            if event == PTRACE_EVENT_CLONE:  # its first stop is a SIGSTOP
                new = ptrace.event_message(tid)
                self.threads.add(new)
                pending.add(new)
                sig = 0
            elif sig == signal.SIGTRAP and event == 0 and breakpoint_at is not None:
                regs = ptrace.get_regs(tid)
                if regs.rip - 1 == breakpoint_at:
                    regs.rip = breakpoint_at
                    ptrace.set_regs(tid, regs)
                    sig = 0
            elif event:
                sig = 0
            self._cont(tid, sig)

    def wait(self) -> Exit:
        """After handover (and SIGCONT): wait for the program to end."""
        if self.exit is None:
            _, status = os.waitpid(self.pid, 0)
            self.exit = Exit.of(status)
        return self.exit

    def kill(self) -> Exit:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        for tid in self.threads:  # a traced thread must be let go to die
            with contextlib.suppress(OSError):
                ptrace.detach(tid, signal.SIGKILL)
        self.threads.clear()
        self._close()
        return self.wait()


_libc = ctypes.CDLL(None, use_errno=True)


def _tgkill(pid: int, tid: int, sig: int) -> None:
    if _libc.syscall(SYS_TGKILL, pid, tid, sig) == -1:
        err = ctypes.get_errno()
        if err != errno.ESRCH:
            raise OSError(err, os.strerror(err))


def _wait_group_stop(pid: int) -> None:
    deadline = time.monotonic() + HANDOVER_TIMEOUT
    while True:
        try:
            states = {read_status(t).state for t in list_threads(pid)}
        except ProcessError:
            return  # exited: whoever comes next reports it
        if states <= {"T", "t"} or "Z" in states:
            return
        if time.monotonic() > deadline:
            raise ProcessError(f"process {pid} did not enter its group stop (states {states})")
        time.sleep(0.001)


def spawn(argv: list[str]) -> Launched:
    """Start argv stopped at its exec: every DT_NEEDED library not yet loaded."""
    parent = os.getpid()
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller's code
        try:
            # Killed with us, even untraced (--no-patch): never an orphan left running.
            ptrace.die_with_parent()
            if os.getppid() != parent:  # the parent died before the line above
                os._exit(127)
            ptrace.traceme()
            os.execvp(argv[0], argv)
        except OSError as e:
            sys.stderr.write(f"micropatch: cannot run {argv[0]}: {e.strerror}\n")
            os._exit(127)
        os._exit(127)  # pragma: no cover
    _, status = os.waitpid(pid, WALL)
    if not os.WIFSTOPPED(status):  # exec failed: the child said why
        return Launched(pid, None, set(), Exit.of(status))
    ptrace.set_options(pid, PTRACE_O_TRACECLONE | PTRACE_O_TRACEEXEC | PTRACE_O_EXITKILL)
    return Launched(pid, Memory(pid), {pid})
