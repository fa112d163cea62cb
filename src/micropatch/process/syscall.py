"""System calls made by a stopped thread of the target on our behalf, crash-safe.

We borrow one thread. The danger is the patcher dying (SIGKILL, OOM) while the
thread holds borrowed registers: the kernel detaches it as it is, and it runs
on from wherever we pointed it. So the thread is never pointed anywhere it
could not finish on its own:

- a small stub is written into executable padding no code reaches
  (`process.stub`): `syscall`, then pop every general register and the flags
  from a frame on the thread's stack, then `ret 128`;
- the frame, written below the thread's red zone, holds the thread's
  *continuation*: the registers it resumes with. For a thread stopped in user
  space they are its registers; for one interrupted in a restartable system
  call (read() on a socket, say) they re-execute that call, exactly as the
  kernel's restart would (`rip - 2`, `rax = orig_rax`);
- the thread is set to the stub with the call's arguments and `orig_rax = -1`
  (no kernel restart), and driven with PTRACE_SYSCALL to the call's entry and
  exit stops: no single-step, so no trap flag is ever left armed;
- after the exit stop the thread gets its continuation registers, which
  resume correctly whatever happens next (and whatever the kernel's restart
  logic would no longer do from a syscall-exit stop).

If the patcher dies at any instant, the thread makes the call (or already
made it), restores its continuation from the frame, and runs on unharmed.
What the orphaned call did (a mapping, an fd) is found and cleaned up by the
next transaction (`live.recovery`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import struct

from micropatch.arch.x86_64.abi import (
    FRAME_REGS,
    FRAME_SIZE,
    STUB,
    SYS_MEMFD_CREATE,
    SYSCALL_ARG_REGS,
    SYSCALL_NAMES,
    UserRegs,
    signed64,
)
from micropatch.arch.x86_64.constants import RED_ZONE
from micropatch.errors import MicropatchError, ProcessExited, RemoteSyscallError
from micropatch.faults import checkpoint
from micropatch.process import ptrace, seccomp
from micropatch.process.linux import MFD_CLOEXEC, MFD_EXEC, PTRACE_O_TRACESYSGOOD, PTRACE_SYSCALL
from micropatch.process.maps import Mapping, mapping_at
from micropatch.process.stub import slack
from micropatch.process.world import StoppedProcess, wait_stop

log = logging.getLogger(__name__)

_SYSCALL_LENGTH = 2
_NR_RESTART_SYSCALL = 219
# -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND: the kernel would run the call
# again; -ERESTART_RESTARTBLOCK: it would run restart_syscall.
_RESTART_SAME = frozenset({-512, -513, -514})
_RESTART_BLOCK = -516
_SYSCALL_STOP = signal.SIGTRAP | 0x80
MAX_SIGNALS = 16  # signals that may interrupt one remote call before we give up


def continuation(regs: UserRegs) -> UserRegs:
    """The registers that resume a stopped thread correctly from user space,
    without relying on the kernel's system call restart."""
    c = regs.copy()
    if signed64(regs.orig_rax) >= 0:
        result = signed64(regs.rax)
        if result in _RESTART_SAME:
            c.rip -= _SYSCALL_LENGTH
            c.rax = regs.orig_rax
        elif result == _RESTART_BLOCK:
            c.rip -= _SYSCALL_LENGTH
            c.rax = _NR_RESTART_SYSCALL
    c.orig_rax = (1 << 64) - 1
    return c


class RemoteSyscalls:
    """System calls in a stopped process, made by one borrowed thread."""

    def __init__(self, proc: StoppedProcess, mappings: list[Mapping]) -> None:
        self.proc = proc
        self.mappings = mappings
        self.tid = _choose_thread(proc)
        self._stub: int | None = None
        self._stub_original = b""
        self._filters: list[list[tuple[int, int, int, int]]] | None = None

    @property
    def instruction(self) -> int:
        """Where the stub's `syscall` instruction is (written on first use)."""
        if self._stub is None:
            at = slack(self.proc.memory, self.mappings, len(STUB))
            if at is None:
                raise RemoteSyscallError(
                    f"process {self.proc.pid}: no executable padding to hold micropatch's "
                    "system call stub in any mapped module; nothing was changed"
                )
            self._stub_original = self.proc.memory.read(at, len(STUB))
            self.proc.memory.write(at, STUB)
            self._stub = at
            log.debug("process %d: syscall stub at %#x", self.proc.pid, at)
        return self._stub

    def close(self) -> None:
        """Put the padding back: no borrowed thread is in the stub any more."""
        if self._stub is not None:
            stub, self._stub = self._stub, None
            # Left in place if the process is gone: inert padding, nothing runs it; and
            # never an error that would hide the one that ended the transaction.
            with contextlib.suppress(MicropatchError):
                self.proc.memory.write(stub, self._stub_original)

    def check_seccomp(self, nr: int, args: tuple[int, ...]) -> None:
        """Refuse a call the target's seccomp policy would punish, before making it."""
        mode = self.proc.status.seccomp_mode
        name = SYSCALL_NAMES.get(nr, str(nr))
        if mode == 1:
            raise RemoteSyscallError(
                f"process {self.proc.pid} runs in seccomp strict mode, which kills it on any "
                f"{name}(); it cannot be patched"
            )
        if mode != 2:
            return
        if self._filters is None:
            try:
                self._filters = seccomp.read_filters(self.tid)
            except seccomp.FilterUnreadable:
                self._filters = []  # not root: we cannot know, the call will tell
        verdict = seccomp.evaluate(self._filters, nr, args, self.instruction)
        if not verdict.allowed:
            raise RemoteSyscallError(
                f"process {self.proc.pid} ({self.proc.status.name}) has a seccomp filter that "
                f"would {verdict.describe()} on {name}(), which micropatch needs to map its "
                "code cave; nothing was changed. Such a process cannot be patched live."
            )

    def __call__(self, nr: int, *args: int) -> int:
        """Make the call; returns the raw result (negative errno on failure)."""
        self.check_seccomp(nr, args)
        proc, tid = self.proc, self.tid
        thread = proc.threads[tid]
        stop_regs = proc.regs(tid)
        if thread.restarted:
            # Out of the stub the kernel restarts nothing, and re-running the call
            # unconditionally would hide the EINTR a signal handler must see
            # (process/restart.py): give the thread back its EINTR.
            stop_regs = stop_regs.copy()
            stop_regs.rax = (1 << 64) - errno.EINTR
            thread.restarted = False
        resume_with = continuation(stop_regs)
        # `ret 128` after the pops lands rsp exactly where it was: the red zone
        # between the frame and rsp is never touched.
        frame = resume_with.rsp - RED_ZONE - FRAME_SIZE
        stack = mapping_at(self.mappings, resume_with.rsp)
        if stack is None or frame < stack.start:
            raise RemoteSyscallError(
                f"process {proc.pid}: thread {tid}'s stack has no room below its red zone "
                "for micropatch's system call frame; nothing was changed"
            )
        values = [getattr(resume_with, name) for name in FRAME_REGS]
        proc.memory.write(frame, struct.pack(f"<{len(values)}Q", *values))
        regs = resume_with.copy()
        regs.rip = self.instruction
        regs.rsp = frame
        regs.rax = nr
        regs.orig_rax = (1 << 64) - 1
        for name, value in zip(SYSCALL_ARG_REGS, args, strict=False):
            setattr(regs, name, value & ((1 << 64) - 1))
        # From here on, a patcher that dies leaves a thread that makes the call,
        # restores `resume_with` from the frame and runs on.
        proc.set_regs(tid, regs)
        # From now on, resume from the continuation, not from the original stop
        # registers: out of a syscall stop the kernel would not restart an
        # interrupted call. Recorded first, so that even a failure below leaves
        # the thread to resume correctly at detach.
        thread.saved_regs = resume_with
        thread.regs_dirty = True
        checkpoint("syscall-borrowed")
        try:
            ptrace.set_options(tid, PTRACE_O_TRACESYSGOOD)
            self._until_syscall_stop(tid)  # entry
            checkpoint("syscall-entered")
            self._until_syscall_stop(tid)  # exit
            result = signed64(ptrace.get_regs(tid).rax)
            ptrace.set_regs(tid, resume_with)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise ProcessExited(f"process {proc.pid} exited during the operation") from e
            raise RemoteSyscallError(f"ptrace on thread {tid} failed: {e.strerror}") from e
        return result

    def _until_syscall_stop(self, tid: int) -> None:
        for _ in range(MAX_SIGNALS):
            ptrace.request(PTRACE_SYSCALL, tid, 0, 0)
            stop = wait_stop(self.proc.pid, tid)
            if stop is None:
                raise ProcessExited(f"process {self.proc.pid} exited during the operation")
            sig = stop & 0xFF
            if sig == _SYSCALL_STOP:
                return
            if sig not in (signal.SIGTRAP, signal.SIGSTOP) or stop >> 8:
                # A signal arrived first: give it back when the thread is let go.
                self.proc.threads[tid].pending_signal = sig
        raise RemoteSyscallError(
            f"process {self.proc.pid}: thread {tid} never reached the remote system call"
        )

    def checked(self, nr: int, *args: int) -> int:
        """Make the call; raise RemoteSyscallError naming the call and the errno on failure."""
        result = self(nr, *args)
        if -4096 < result < 0:
            raise self.error(nr, result)
        return result

    def memfd_create(self, name: bytes) -> int:
        """memfd_create(name) in the target, close-on-exec (and MFD_EXEC where the
        kernel knows it, 6.3+). The name is passed below the red zone and below the
        remote call's frame for the moment of the call, then the bytes are put back."""
        memory = self.proc.memory
        regs = self.proc.regs(self.tid)
        scratch = (regs.rsp - RED_ZONE - FRAME_SIZE - 64) & ~0xF
        stack = mapping_at(self.mappings, scratch)
        if stack is None or stack.perms[:2] != "rw" or not stack.contains(scratch + len(name)):
            raise RemoteSyscallError(
                f"process {self.proc.pid}: thread {self.tid} has no writable stack below "
                f"rsp={regs.rsp:#x} to pass the name of a memfd; nothing was changed"
            )
        saved = memory.read(scratch, len(name))
        memory.write(scratch, name)
        try:
            fd = self(SYS_MEMFD_CREATE, scratch, MFD_CLOEXEC | MFD_EXEC)
            if fd == -errno.EINVAL:  # kernels before 6.3 know no MFD_EXEC
                fd = self.checked(SYS_MEMFD_CREATE, scratch, MFD_CLOEXEC)
            elif fd < 0:
                raise self.error(SYS_MEMFD_CREATE, fd)
        finally:
            memory.write(scratch, saved)
        return fd

    def error(self, nr: int, result: int) -> RemoteSyscallError:
        err = -result
        name = SYSCALL_NAMES.get(nr, str(nr))
        hint = ""
        if err in (errno.EPERM, errno.EACCES) and self.proc.status.seccomp_mode == 2:
            hint = " (its seccomp filter forbids it)"
        return RemoteSyscallError(
            f"{name}() in process {self.proc.pid} ({self.proc.status.name}) failed: "
            f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)}){hint}; "
            "nothing was changed"
        )


def _choose_thread(proc: StoppedProcess) -> int:
    """The main thread if it holds no intercepted signal, else the first that holds none."""
    return min(proc.threads, key=lambda t: (proc.threads[t].pending_signal != 0, t != proc.pid))
