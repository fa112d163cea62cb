"""The x86-64 Linux ABI seen through ptrace: registers and system calls."""

from __future__ import annotations

import ctypes

AUDIT_ARCH = 0xC000003E  # AUDIT_ARCH_X86_64: what seccomp filters see as the arch

SYS_TGKILL = 234
# system call numbers (arch/x86/entry/syscalls/syscall_64.tbl)
SYS_OPEN = 2
SYS_CLOSE = 3
SYS_MMAP = 9
SYS_MPROTECT = 10
SYS_MUNMAP = 11
SYS_FTRUNCATE = 77
SYS_OPENAT = 257
SYS_MEMFD_CREATE = 319
SYS_OPENAT2 = 437
SYS_OPENS = (SYS_OPEN, SYS_OPENAT, SYS_OPENAT2)  # those that return a new file descriptor
SYSCALL_NAMES = {
    SYS_OPEN: "open",
    SYS_OPENAT: "openat",
    SYS_OPENAT2: "openat2",
    SYS_CLOSE: "close",
    SYS_MMAP: "mmap",
    SYS_MPROTECT: "mprotect",
    SYS_MUNMAP: "munmap",
    SYS_FTRUNCATE: "ftruncate",
    SYS_MEMFD_CREATE: "memfd_create",
}


# The crash-safe remote system call (process/syscall.py): `syscall`, then pop
# r15..rdi in user_regs_struct order and the flags from a frame, then `ret 0x80`.
STUB = bytes.fromhex(
    "0f05" "415f" "415e" "415d" "415c" "5d" "5b" "415b" "415a" "4159" "4158"
    "58" "59" "5a" "5e" "5f" "9d" "c28000"
)  # fmt: skip
FRAME_REGS = (
    "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
    "rax", "rcx", "rdx", "rsi", "rdi", "eflags", "rip",
)  # fmt: skip
FRAME_SIZE = 8 * len(FRAME_REGS)


class UserRegs(ctypes.Structure):
    """struct user_regs_struct from <sys/user.h>, in kernel order."""

    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "r15",
            "r14",
            "r13",
            "r12",
            "rbp",
            "rbx",
            "r11",
            "r10",
            "r9",
            "r8",
            "rax",
            "rcx",
            "rdx",
            "rsi",
            "rdi",
            "orig_rax",
            "rip",
            "cs",
            "eflags",
            "rsp",
            "ss",
            "fs_base",
            "gs_base",
            "ds",
            "es",
            "fs",
            "gs",
        )
    ]

    def copy(self) -> UserRegs:
        clone = UserRegs()
        ctypes.memmove(ctypes.byref(clone), ctypes.byref(self), ctypes.sizeof(UserRegs))
        return clone


SYSCALL_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


def signed64(value: int) -> int:
    """Interpret a register value as a signed 64-bit integer (syscall results)."""
    return value - (1 << 64) if value & (1 << 63) else value
