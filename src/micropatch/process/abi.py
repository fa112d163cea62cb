"""Linux x86-64 constants and structures: ptrace requests, syscalls, registers.

Named once here so that no other module spells a magic number.
"""

from __future__ import annotations

import ctypes

# ptrace requests (include/uapi/linux/ptrace.h)
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_SINGLESTEP = 9
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_SECCOMP_GET_FILTER = 0x420C
PTRACE_EVENT_STOP = 128
# for spawning a traced program (process/launch.py)
PTRACE_TRACEME = 0
PTRACE_CONT = 7
PTRACE_SETOPTIONS = 0x4200
PTRACE_GETEVENTMSG = 0x4201
PTRACE_LISTEN = 0x4208
PTRACE_O_TRACECLONE = 0x8
PTRACE_O_TRACEEXIT = 0x40
PTRACE_O_EXITKILL = 0x100000
PTRACE_EVENT_CLONE = 3
PTRACE_EVENT_EXIT = 6
PTRACE_O_TRACEEXEC = 0x10
PTRACE_EVENT_EXEC = 4

# auxiliary vector (include/uapi/linux/auxvec.h) and ELF dynamic section
AT_NULL = 0
AT_PHDR = 3
AT_PHNUM = 5
AT_ENTRY = 9
PT_DYNAMIC = 2
PT_PHDR = 6
DT_NULL = 0
DT_DEBUG = 21
INT3 = b"\xcc"
SYS_TGKILL = 234

# waitpid
WALL = 0x40000000  # __WALL: wait for threads (clone children) too

# system call numbers (arch/x86/entry/syscalls/syscall_64.tbl)
SYS_CLOSE = 3
SYS_MMAP = 9
SYS_MPROTECT = 10
SYS_MUNMAP = 11
SYS_FTRUNCATE = 77
SYS_MEMFD_CREATE = 319
SYSCALL_NAMES = {
    SYS_CLOSE: "close",
    SYS_MMAP: "mmap",
    SYS_MPROTECT: "mprotect",
    SYS_MUNMAP: "munmap",
    SYS_FTRUNCATE: "ftruncate",
    SYS_MEMFD_CREATE: "memfd_create",
}
SYSCALL_INSN = b"\x0f\x05"

# mmap / memfd flags
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
MAP_PRIVATE = 0x02
MAP_FIXED_NOREPLACE = 0x100000
MFD_CLOEXEC = 0x1
MFD_EXEC = 0x10

PAGE_SIZE = 4096
RED_ZONE = 128

# seccomp (include/uapi/linux/seccomp.h, audit.h)
AUDIT_ARCH_X86_64 = 0xC000003E
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_DATA = 0x0000FFFF


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
