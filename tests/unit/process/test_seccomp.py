"""The classic-BPF interpreter against filters written as the kernel would see them."""

import errno

from micropatch.arch.x86_64.abi import AUDIT_ARCH as AUDIT_ARCH_X86_64
from micropatch.arch.x86_64.abi import SYS_MMAP, SYS_MUNMAP
from micropatch.process.linux import SECCOMP_RET_ALLOW
from micropatch.process.seccomp import evaluate

LD_ABS = 0x20
JEQ_K = 0x15
JGE_K = 0x35
RET_K = 0x06
ERRNO = 0x00050000
KILL_PROCESS = 0x80000000


def deny(nr: int, action: int) -> list[tuple[int, int, int, int]]:
    return [
        (LD_ABS, 0, 0, 4),  # arch
        (JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        (RET_K, 0, 0, KILL_PROCESS),
        (LD_ABS, 0, 0, 0),  # nr
        (JEQ_K, 0, 1, nr),
        (RET_K, 0, 0, action),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]


def test_no_filter_allows() -> None:
    assert evaluate([], SYS_MMAP, (0, 4096), 0).allowed


def test_errno_verdict() -> None:
    verdict = evaluate([deny(SYS_MMAP, ERRNO | errno.EPERM)], SYS_MMAP, (0, 4096), 0x1000)
    assert not verdict.allowed
    assert verdict.describe() == "fail with EPERM"
    assert evaluate([deny(SYS_MMAP, ERRNO | 1)], SYS_MUNMAP, (0, 4096), 0).allowed


def test_most_restrictive_filter_wins() -> None:
    filters = [deny(SYS_MMAP, ERRNO | errno.EPERM), deny(SYS_MMAP, KILL_PROCESS)]
    assert evaluate(filters, SYS_MMAP, (), 0).describe() == "kill the process"


def test_argument_checks() -> None:
    # Deny mmap only when PROT_EXEC (arg 2, bit 2) is asked for.
    program = [
        (LD_ABS, 0, 0, 0),
        (JEQ_K, 0, 3, SYS_MMAP),
        (LD_ABS, 0, 0, 16 + 2 * 8),
        (0x45, 0, 1, 0x4),  # JSET
        (RET_K, 0, 0, ERRNO | errno.EACCES),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    assert not evaluate([program], SYS_MMAP, (0, 4096, 5), 0).allowed
    assert evaluate([program], SYS_MMAP, (0, 4096, 1), 0).allowed
    assert evaluate([program], SYS_MUNMAP, (0, 4096, 5), 0).allowed


def test_unsigned_compare() -> None:
    program = [
        (LD_ABS, 0, 0, 0),
        (JGE_K, 0, 1, 300),
        (RET_K, 0, 0, ERRNO | 1),
        (RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
    assert not evaluate([program], 319, (), 0).allowed
    assert evaluate([program], SYS_MMAP, (), 0).allowed
