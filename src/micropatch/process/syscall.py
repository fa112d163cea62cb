"""System calls made by a stopped thread of the target on our behalf.

We borrow one thread: save its registers, point it at a `syscall`
instruction that already exists in the process (the vDSO has one), set
`orig_rax` to -1 so the kernel does not restart a system call the thread was
blocked in, single-step over the instruction, read the result, and put every
register back. The interrupted system call then restarts normally on resume.
"""

from __future__ import annotations

import errno
import os
import signal

from micropatch.arch.x86_64.abi import SYSCALL_ARG_REGS, SYSCALL_NAMES, signed64
from micropatch.arch.x86_64.constants import SYSCALL_INSN
from micropatch.errors import MicropatchError, RemoteSyscallError
from micropatch.process import seccomp
from micropatch.process.maps import Mapping
from micropatch.process.world import StoppedProcess

MAX_STEPS = 8  # single-steps interrupted by incoming signals before we give up


class RemoteSyscalls:
    def __init__(self, proc: StoppedProcess, mappings: list[Mapping]) -> None:
        self.proc = proc
        self.mappings = mappings
        self.tid = proc.pid if proc.pid in proc.threads else min(proc.threads)
        self._insn: int | None = None
        self._filters: list[list[tuple[int, int, int, int]]] | None = None

    @property
    def instruction(self) -> int:
        if self._insn is None:
            self._insn = self._find_syscall_instruction()
        return self._insn

    def _find_syscall_instruction(self) -> int:
        """A `syscall` instruction, preferably in a page the process already has resident.

        Threads stopped in a system call sit just after one: using it touches no new
        page (reading the vDSO would add it to the target's resident memory).
        """
        for tid in sorted(self.proc.threads, key=lambda t: t != self.tid):
            rip: int = self.proc.regs(tid).rip
            try:
                if (
                    self.proc.memory.read(rip - len(SYSCALL_INSN), len(SYSCALL_INSN))
                    == SYSCALL_INSN
                ):
                    return rip - len(SYSCALL_INSN)
            except MicropatchError:
                continue
        candidates = sorted(
            (m for m in self.mappings if m.executable and m.readable),
            key=lambda m: m.path != "[vdso]",
        )
        for mapping in candidates:
            try:
                code = self.proc.memory.read(mapping.start, min(mapping.size, 1 << 20))
            except MicropatchError:
                continue
            at = code.find(SYSCALL_INSN)
            if at >= 0:
                return mapping.start + at
        raise RemoteSyscallError(
            f"process {self.proc.pid}: no readable `syscall` instruction found (no vDSO, no libc)"
        )

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
        saved = proc.regs(tid)
        regs = saved.copy()
        regs.rax = nr
        regs.orig_rax = (1 << 64) - 1
        regs.rip = self.instruction
        for name, value in zip(SYSCALL_ARG_REGS, args, strict=False):
            setattr(regs, name, value & ((1 << 64) - 1))
        proc.set_regs(tid, regs)
        done = self.instruction + len(SYSCALL_INSN)
        for _ in range(MAX_STEPS):
            sig = proc.step(tid) & 0xFF
            after = proc.current_regs(tid)
            if after.rip == done:
                proc.set_regs(tid, saved)
                return signed64(after.rax)
            if sig != signal.SIGTRAP:
                # A signal arrived before the instruction ran: keep it for later, step again.
                proc.threads[tid].pending_signal = sig
        proc.set_regs(tid, saved)
        raise RemoteSyscallError(
            f"process {self.proc.pid}: thread {tid} never completed the remote system call"
        )

    def checked(self, nr: int, *args: int) -> int:
        """Make the call; raise RemoteSyscallError naming the call and the errno on failure."""
        result = self(nr, *args)
        if -4096 < result < 0:
            raise self.error(nr, result)
        return result

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
