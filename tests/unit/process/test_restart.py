"""process.restart: which stop registers qualify for a restart (the kernel's side is
tests/integration/test_blocked_calls.py)."""

from __future__ import annotations

import errno

import pytest

from micropatch.arch.x86_64.abi import UserRegs
from micropatch.process import restart

EINTR = (1 << 64) - errno.EINTR
FOREVER = (1 << 64) - 1  # -1 as a 64-bit register; epoll reads the low 32 bits


def _regs(nr: int, rax: int = EINTR, **args: int) -> UserRegs:
    regs = UserRegs()
    regs.orig_rax, regs.rax = nr, rax
    for name, value in args.items():
        setattr(regs, name, value)
    return regs


@pytest.mark.parametrize(
    ("regs", "expected"),
    [
        (_regs(232, r10=FOREVER), True),  # epoll_wait(..., -1)
        (_regs(232, r10=0xFFFFFFFF), True),  # -1 as a 32-bit int, upper half clear
        (_regs(232, r10=1000), False),  # a timeout
        (_regs(232, r10=0), False),  # no wait at all
        (_regs(281, r10=FOREVER), True),  # epoll_pwait
        (_regs(441, r10=0), True),  # epoll_pwait2(..., NULL, ...)
        (_regs(441, r10=0x7FFC0000), False),  # a timespec
        (_regs(128, rdx=0), True),  # sigwaitinfo
        (_regs(128, rdx=0x7FFC0000), False),  # sigtimedwait
        (_regs(65), True),  # semop
        (_regs(220, r10=0), True),  # semtimedop(..., NULL)
        (_regs(220, r10=0x7FFC0000), False),
        (_regs(232, rax=(1 << 64) - 514, r10=FOREVER), False),  # not EINTR
        (_regs(232, rax=0, r10=FOREVER), False),
        (_regs(0), False),  # read(): the kernel restarts it itself
        (_regs(FOREVER), False),  # not in a system call
    ],
)
def test_candidate(regs: UserRegs, expected: bool) -> None:
    assert restart.candidate(regs) is expected


def test_restarted_keeps_everything_but_the_result() -> None:
    regs = _regs(232, r10=FOREVER, rip=0x1234, rdi=5)
    new = restart.restarted(regs)
    assert new.rax == (1 << 64) - 514 and regs.rax == EINTR
    assert (new.orig_rax, new.rip, new.rdi, new.r10) == (232, 0x1234, 5, FOREVER)
