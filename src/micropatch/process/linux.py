"""Linux constants: ptrace requests, auxiliary vector, waitpid, mmap and seccomp flags.

The architecture's registers and system call numbers are in
`micropatch.arch.x86_64.abi`.

Named once here so that no other module spells a magic number.
"""

from __future__ import annotations

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
PTRACE_SYSCALL = 24
PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_GET_SYSCALL_INFO = 0x420E
PTRACE_SYSCALL_INFO_ENTRY = 1
PTRACE_SYSCALL_INFO_EXIT = 2

# auxiliary vector (include/uapi/linux/auxvec.h) and ELF dynamic section
AT_NULL = 0
AT_PHDR = 3
AT_PHNUM = 5
AT_ENTRY = 9
PT_DYNAMIC = 2
PT_PHDR = 6
DT_NULL = 0
DT_DEBUG = 21

# waitpid
WALL = 0x40000000  # __WALL: wait for threads (clone children) too

# mmap / memfd flags
PROT_READ = 0x1
PROT_WRITE = 0x2
PROT_EXEC = 0x4
MAP_PRIVATE = 0x02
MAP_FIXED_NOREPLACE = 0x100000
MFD_CLOEXEC = 0x1
MFD_EXEC = 0x10

# seccomp (include/uapi/linux/seccomp.h, audit.h)
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_DATA = 0x0000FFFF
