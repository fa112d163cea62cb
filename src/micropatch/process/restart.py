"""Blocking calls a stop would end with EINTR, restarted instead where no one can tell.

Interrupting a thread (PTRACE_INTERRUPT) wakes it from an interruptible sleep
as a signal would. Most blocking calls then return one of the kernel's restart
codes, and the kernel runs them again once the stop ends: the program sees
nothing. A few return -EINTR as they do for a signal (`epoll_wait`,
`sigtimedwait`, `semop`; docs/engine.md lists what this kernel does, measured
with tests/targets/waiters.c), and the program sees the call fail although
no signal came.

For those, while the thread is in the interrupt's stop, we change its result
from -EINTR to -ERESTARTNOHAND. What the kernel does with that code once the
thread leaves the stop (arch/x86/kernel/signal.c, arch_do_signal_or_restart):

- a signal is delivered to a handler: the result becomes -EINTR, the handler
  runs and the call returns EINTR after it, exactly as without the stop (a
  program woken from epoll_wait by a signal keeps its wake-up);
- no handler runs: the call is made again, same registers (`rip - 2`,
  `rax = orig_rax`), before any instruction of the thread's runs.

The second case is indistinguishable from the call never having been
interrupted only if running it again waits for the same thing for the same
time. So we restart only calls without a timeout (the time already waited
cannot be known, and waiting the whole timeout again would be late); the
arguments are the same registers and the same memory (the process is stopped),
and what the call waits for (an event, a signal, a semaphore) is checked again
on entry, so anything that arrived during the stop is returned then. A call
with a timeout keeps its EINTR.

Only a thread in the stop our interrupt caused qualifies (`Thread.pending_signal`
is 0: no signal was intercepted), with `orig_rax` a listed call, `rax == -EINTR`
and the two bytes before `rip` a `syscall` instruction (so this is the return
of that call, not a signal frame or a 32-bit `int 0x80`).
"""

from __future__ import annotations

import errno

from micropatch.arch.x86_64.abi import UserRegs, signed64

ERESTARTNOHAND = 514
SYSCALL_INSN = b"\x0f\x05"


def _int32(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & (1 << 31) else value


# The calls we restart: number -> name (x86-64 numbers, arch/x86/entry/syscalls/syscall_64.tbl).
CALLS = {
    232: "epoll_wait",
    281: "epoll_pwait",
    441: "epoll_pwait2",
    128: "rt_sigtimedwait",
    65: "semop",
    220: "semtimedop",
}


def waits_forever(nr: int, regs: UserRegs) -> bool:
    """True if call `nr` with these argument registers has no timeout."""
    if nr in (232, 281):  # the timeout in ms, an int, in r10: negative is none
        return _int32(regs.r10) < 0
    if nr in (441, 220):  # struct timespec *timeout in r10: NULL is none
        return int(regs.r10) == 0
    if nr == 128:  # const struct timespec *uts in rdx: NULL is sigwaitinfo()
        return int(regs.rdx) == 0
    return nr == 65  # semop has none


def candidate(regs: UserRegs) -> bool:
    """True if these stop registers are a listed call, without a timeout, that
    returned -EINTR (the caller still checks the `syscall` instruction)."""
    nr = signed64(regs.orig_rax)
    if nr not in CALLS or signed64(regs.rax) != -errno.EINTR:
        return False
    return waits_forever(nr, regs)


def restarted(regs: UserRegs) -> UserRegs:
    """The registers that make the kernel restart the call unless a handler runs."""
    new = regs.copy()
    new.rax = (1 << 64) - ERESTARTNOHAND
    return new
