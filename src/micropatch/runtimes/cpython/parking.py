"""Where each thread of a stopped interpreter is, and which may run Python for us.

A thread is *parked* when all of these hold, checked with every thread stopped:
- it is blocked in one of a few system calls that wait for I/O or time
  (read, poll, select, clock_nanosleep, accept4, recvfrom, wait4, ...), and
  the call has not transferred anything yet (its result is a restart code, or
  EINTR: `epoll_wait` is never restarted, and our stop interrupts it);
- it is in one frame of the C library: unwinding it once with the library's
  call frame information (`elf.cfi`) lands in CPython's own code, at a `call`
  whose target (through the PLT or the GOT) is exactly the C library function
  the thread is in, or a wrapper that only sets registers and jumps there
  (glibc's `waitpid` is `xor ecx, ecx; jmp wait4`: no frame of its own), and
  that function is one of the system call wrappers whitelisted here; or it is
  in a `read` under C stdio's `fgets` called by CPython (`input()` on a
  terminal), which holds only that stream's lock, recursive and taken by
  nothing the runner does, and which returns the EINTR to CPython, who reads
  again as after a signal;
- it has a thread state in the main interpreter and does not hold the GIL;
- it has room on its stack for the runner.
Such a thread is in CPython's `Py_BEGIN_ALLOW_THREADS` region around that one
call: it holds no lock of the interpreter, the allocator, the dynamic linker
or stdio, and CPython retries the call on EINTR (PEP 475). It may take the GIL
with `PyGILState_Ensure`, which is what a C library callback does.

A thread *waits on a lock* when it is in the C library's `sem_wait`,
`sem_clockwait` or `sem_timedwait` (a futex wait, possibly a few frames deep),
called from CPython (`PyThread_acquire_lock_timed`): given EINTR, CPython
runs the pending calls (the main thread only) and waits again.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from iced_x86 import FlowControl, OpKind

from micropatch.arch.x86_64.abi import UserRegs, signed64
from micropatch.arch.x86_64.decode import decode, is_invalid, near_branch_target
from micropatch.elf.cfi import CfiUnsupported, caller, frame_rule
from micropatch.elf.loaded import LoadedImage
from micropatch.errors import ElfError, MemoryAccessError
from micropatch.process.maps import Mapping, mapping_at
from micropatch.process.memory import Memory
from micropatch.runtimes.cpython.interpreter import Interpreter, ThreadState

# Results of a system call interrupted by our stop before it did anything:
# -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK.
RESTARTS = frozenset({-512, -513, -514, -516})
EINTR = 4
# ... or EINTR, which calls never restarted (epoll_wait) return when our stop interrupts them.
NOTHING_DONE = RESTARTS | {-EINTR}
SYS_FUTEX = 202
# Blocking system calls a parked thread may be in (x86-64 numbers).
PARKING_SYSCALLS = frozenset({
    0, 1, 7, 17, 19, 20, 23, 35, 43, 44, 45, 46, 47, 61, 230, 232, 247, 270, 271, 281, 288, 441,
})  # fmt: skip
# The C library functions CPython calls them through.
PARKING_FUNCTIONS = (
    "read", "write", "readv", "writev", "pread64", "recv", "recvfrom", "recvmsg", "send",
    "sendto", "sendmsg", "poll", "ppoll", "select", "pselect", "epoll_wait", "epoll_pwait",
    "clock_nanosleep", "nanosleep", "accept", "accept4", "wait4", "waitpid", "waitid",
)  # fmt: skip
# C stdio CPython reads a terminal with (`input()`: PyOS_StdioReadline's fgets), parked
# only in a `read` (it holds that stream's lock, which nothing in the runner takes).
STDIO_FUNCTIONS = ("fgets",)
SYS_READ = 0
LOCK_FUNCTIONS = ("sem_wait", "sem_clockwait", "sem_timedwait")
STACK_ROOM = 256 * 1024  # bytes below rsp the runner may need (parser, compiler, frames)
MAX_LIBC_FRAMES = 6
TAIL_INSTRUCTIONS = 4  # what a wrapper that jumps to another may do first
_CALLEE_SAVED = ("rip", "rsp", "rbp", "rbx", "r12", "r13", "r14", "r15")


@dataclass(frozen=True)
class Where:
    """One thread, classified."""

    tid: int
    tstate: ThreadState | None
    main: bool
    parked: bool  # may be hijacked to run the runner
    lock_wait: bool  # in a sem wait from CPython: EINTR makes it run pending calls
    why: str  # for messages: where it is


class Libc:
    """The C library of the process: its image and the addresses of the functions
    CPython reaches the whitelisted system calls through."""

    def __init__(self, memory: Memory, mappings: list[Mapping], start: int, name: str) -> None:
        self.image = LoadedImage(memory.read, start, name)
        self.ranges = [(m.start, m.end) for m in mappings if m.executable and
                       any(x.start == start and x.inode == m.inode for x in mappings)]  # fmt: skip
        self.parking = {a for n in PARKING_FUNCTIONS if (a := self.image.symbol(n)) is not None}
        self.locks = {a for n in LOCK_FUNCTIONS if (a := self.image.symbol(n)) is not None}
        self.stdio = {a for n in STDIO_FUNCTIONS if (a := self.image.symbol(n)) is not None}

    def contains(self, address: int) -> bool:
        return any(start <= address < end for start, end in self.ranges)


def classify(
    interpreter: Interpreter,
    memory: Memory,
    mappings: list[Mapping],
    libc: Libc,
    tid: int,
    regs: UserRegs,
    tstate: ThreadState | None,
    main: bool,
    gil_holder: int | None,
) -> Where:
    def where(why: str, parked: bool = False, lock_wait: bool = False) -> Where:
        return Where(tid, tstate, main, parked, lock_wait, why)

    nr, result = signed64(regs.orig_rax), signed64(regs.rax)
    if tstate is None:
        return where("no Python thread state")
    if gil_holder == tstate.address:
        return where("holds the GIL")
    if nr < 0 or result not in NOTHING_DONE:
        return where("not blocked in a system call")
    if not libc.contains(regs.rip):
        return where(f"in system call {nr} outside the C library")
    try:
        target, call_site = _libc_caller(memory, libc, regs)
    except (CfiUnsupported, ElfError, MemoryAccessError) as exc:
        return where(f"in system call {nr}; its stack cannot be read ({exc})")
    if not interpreter.is_own_code(call_site):
        return where(f"in system call {nr} called by code that is not CPython's")
    if nr == SYS_FUTEX:
        return where("waits on a lock", lock_wait=target in libc.locks)
    stdio = nr == SYS_READ and target in libc.stdio
    if not stdio and (nr not in PARKING_SYSCALLS or target not in libc.parking):
        return where(f"in system call {nr}, not one a thread is parked in")
    if stack_room(interpreter.pid, mappings, regs.rsp) < STACK_ROOM:
        return where("parked, with too little stack left")
    return where(f"parked in system call {nr}", parked=True)


def stack_room(pid: int, mappings: list[Mapping], rsp: int) -> int:
    """Bytes a thread's stack can still take below rsp: to the start of its mapping,
    or for the main thread's stack, which grows, to its size limit."""
    stack = mapping_at(mappings, rsp)
    if stack is None:
        return 0
    if stack.path != "[stack]":
        return rsp - stack.start
    limit = _stack_limit(pid)
    return rsp - stack.start if limit is None else rsp - (stack.end - limit)


def _stack_limit(pid: int) -> int | None:
    """The soft RLIMIT_STACK of a process; None if unlimited or unknown."""
    try:
        with open(f"/proc/{pid}/limits") as f:
            for line in f:
                if line.startswith("Max stack size"):
                    soft = line.split()[3]
                    return None if soft == "unlimited" else int(soft)
    except (OSError, ValueError, IndexError):
        pass
    return None


def _libc_caller(memory: Memory, libc: Libc, regs: UserRegs) -> tuple[int | None, int]:
    """Unwind out of the C library: the function the first caller outside it called,
    and that caller's return address. For a thread in a syscall wrapper called
    directly, the function must be the one the thread is in."""
    state = {name: getattr(regs, name) for name in _CALLEE_SAVED}
    innermost = None
    for depth in range(MAX_LIBC_FRAMES):
        pc = state["rip"] - (1 if depth else 0)
        start, rule = frame_rule(libc.image, pc)
        innermost = start if innermost is None else innermost
        state = caller(memory.read, rule, state)
        if not libc.contains(state["rip"]):
            target = call_target(memory, state["rip"])
            if depth == 0 and target != innermost:
                direct = target in libc.parking and _jumps_to(memory, target, innermost)
                return (target if direct else None), state["rip"]
            return target, state["rip"]
    raise CfiUnsupported("too many C library frames")


def _jumps_to(memory: Memory, start: int | None, destination: int) -> bool:
    """The function at `start` only sets registers, then jumps to `destination` (a
    few instructions, no memory operand, no stack change): a thread in `destination`
    that it reached is as if called directly."""
    if start is None:
        return False
    for instruction in decode(memory.read(start, 32), start)[:TAIL_INSTRUCTIONS]:
        if instruction.flow_control == FlowControl.UNCONDITIONAL_BRANCH:
            return near_branch_target(instruction) == destination
        if (
            is_invalid(instruction)
            or instruction.flow_control != FlowControl.NEXT
            or instruction.stack_pointer_increment
            or any(instruction.op_kind(i) == OpKind.MEMORY for i in range(instruction.op_count))
        ):
            return False
    return False


def call_target(memory: Memory, return_address: int) -> int | None:
    """Where the call that returns to `return_address` went, following a PLT stub
    or a GOT slot to the function; None if it is not a direct or GOT call."""
    before = memory.read(return_address - 6, 6)
    if before[1] == 0xE8:  # call rel32
        target = return_address + struct.unpack("<i", before[2:])[0]
        return _through_plt(memory, target & ((1 << 64) - 1))
    if before[:2] == b"\xff\x15":  # call [rip + disp32]
        slot = return_address + struct.unpack("<i", before[2:])[0]
        value: int = struct.unpack("<Q", memory.read(slot, 8))[0]
        return value
    return None


def _through_plt(memory: Memory, target: int) -> int:
    """A PLT stub's destination (`[endbr64] [bnd] jmp [rip + disp32]`), or the target."""
    code = memory.read(target, 16)
    at = 4 if code[:4] == b"\xf3\x0f\x1e\xfa" else 0
    at += 1 if code[at] == 0xF2 else 0
    if code[at : at + 2] != b"\xff\x25":
        return target
    slot = target + at + 6 + struct.unpack("<i", code[at + 2 : at + 6])[0]
    value: int = struct.unpack("<Q", memory.read(slot, 8))[0]
    return value
