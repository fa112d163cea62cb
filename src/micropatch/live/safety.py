"""Where the stopped threads are, and whether they let us change the code.

A thread inside a site (past its first byte) would resume in the middle of
our jump. Rather than wait for it to leave, a thread stopped exactly at the
start of a displaced instruction is moved to the same instruction in the
trampoline's relocated copy, which runs it identically. Anywhere else inside
a site it is unsafe, and the caller resumes the process and tries again.

Removal moves no thread and steps none: the removed patch's trampolines are
retired, not freed, so a thread in one finishes it and jumps back to the
restored code. A retired trampoline is reclaimed later, once no thread's
instruction pointer or stack refers to it (`in_use`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from micropatch.arch import Site, TrampolineLayout
from micropatch.arch.x86_64.abi import UserRegs, signed64
from micropatch.process.maps import Mapping, mapping_at
from micropatch.process.world import StoppedProcess

# -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK: on
# resume the kernel moves rip back over the 2-byte `syscall` to run it again.
_RESTARTING = frozenset({-512, -513, -514, -516})
_SYSCALL_LENGTH = 2
STACK_SCAN_LIMIT = 8 << 20
_UPPER_BYTES = 6  # bytes 2..7 of a 64-bit word


class Unsafe(Exception):
    """A thread is in the way this time; resume, and try again later."""


def effective_rip(regs: UserRegs) -> int:
    """The next instruction the thread will really execute."""
    rip: int = regs.rip
    if signed64(regs.orig_rax) >= 0 and signed64(regs.rax) in _RESTARTING:
        return rip - _SYSCALL_LENGTH
    return rip


@dataclass(frozen=True)
class Entering:
    """A site about to be patched; `movable` if its instructions get a relocated copy."""

    site: Site
    movable: bool
    where: str


@dataclass(frozen=True)
class PendingMove:
    """A thread to move into site `index`'s relocated copy, once its address is known."""

    tid: int
    index: int  # which entering site
    instruction: int  # which displaced instruction it stopped at


@dataclass
class Placement:
    pending: list[PendingMove]


def place_threads(proc: StoppedProcess, entering: list[Entering]) -> Placement:
    """Decide, for every thread, that it may stay or where it must go; else raise Unsafe."""
    placement = Placement([])
    for tid in proc.threads:
        regs = proc.regs(tid)
        eff = effective_rip(regs)
        for index, new in enumerate(entering):
            if new.site.address < eff < new.site.end:
                starts = list(new.site.starts)
                if not new.movable or eff not in starts:
                    raise Unsafe(f"thread {tid} is executing inside {new.where} (rip={eff:#x})")
                placement.pending.append(PendingMove(tid, index, starts.index(eff)))
    return placement


def pending_call(proc: StoppedProcess, stub: range) -> None:
    """Unsafe if a thread is in the remote system call stub (`process.syscall`): a
    patcher killed while borrowing it left it to make its call and restore its own
    registers, which it has not done yet. Its call (an munmap of a cave, say) must
    land before anything is decided about the caves."""
    for tid in proc.threads:
        if proc.regs(tid).rip in stub:
            raise Unsafe(f"thread {tid} is finishing a system call a killed micropatch started")


def in_use(
    proc: StoppedProcess, mappings: list[Mapping], ranges: list[tuple[int, int]]
) -> set[int]:
    """Indexes of the `ranges` (retired trampolines) some thread may still be in: its
    instruction pointer, or any word on its stack (a return address), points there."""
    used: set[int] = set()
    if not ranges:
        return used

    def mark(word: int) -> None:
        for index, (low, high) in enumerate(ranges):
            if low <= word < high:
                used.add(index)

    low = min(low for low, _ in ranges)
    high = max(high for _, high in ranges)
    for tid in proc.threads:
        regs = proc.regs(tid)
        mark(regs.rip)
        mark(effective_rip(regs))
        stack = mapping_at(mappings, regs.rsp)
        if stack is None:
            continue
        top = min(stack.end, regs.rsp + STACK_SCAN_LIMIT)
        start = regs.rsp & ~7
        for word in words_within(proc.memory.read(start, top - start), low, high):
            mark(word)
    return used


def words_within(data: bytes, low: int, high: int) -> Iterator[int]:
    """The aligned little-endian 64-bit words of `data` in [low, high), found at the
    speed of `bytes.find`: every such word's six high bytes are one of the few values
    `word >> 16` takes in the range (a cave spans 64 KiB: one or two), so those are
    searched for, at offsets 2 mod 8, and only the hits decoded."""
    for upper in range(low >> 16, ((high - 1) >> 16) + 1):
        needle = upper.to_bytes(_UPPER_BYTES, "little")
        at = data.find(needle, 2)
        while at != -1 and at + _UPPER_BYTES <= len(data):
            if at % 8 == 2:
                word = int.from_bytes(data[at - 2 : at + _UPPER_BYTES], "little")
                if low <= word < high:
                    yield word
            at = data.find(needle, at + 1)


def into_copy(move: PendingMove, layout: TrampolineLayout, regs: UserRegs) -> int:
    """The new rip of a pending move, from the thread's registers as they are now
    (a borrowed thread no longer restarts its system call: its rip already did)."""
    delta: int = regs.rip - effective_rip(regs)
    return layout.copies[move.instruction] + delta
