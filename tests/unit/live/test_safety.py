"""Where stopped threads may stay or must go, decided from plain registers and bytes.

A fake stopped process holds registers and memory; the decisions are the real ones.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from micropatch.arch import TrampolineLayout
from micropatch.arch.x86_64.abi import UserRegs
from micropatch.arch.x86_64.relocate import relocated_addresses
from micropatch.arch.x86_64.site import plan_site
from micropatch.live.safety import (
    STACK_SCAN_LIMIT,
    Entering,
    PendingMove,
    Unsafe,
    effective_rip,
    in_use,
    into_copy,
    pending_call,
    place_threads,
    words_within,
)
from micropatch.process.maps import Mapping
from micropatch.process.syscall import continuation

HOT = 0x401000  # mov eax,edi; pause; pause | lea; ret  (tests/targets/spinner_asm.S)
HOT_SITE = plan_site(bytes.fromhex("89f8f390f3908d444001c3"), HOT, HOT)
READ = 0x402000  # xor eax,eax; syscall; ret
READ_SITE = plan_site(bytes.fromhex("31c00f05c3"), READ, READ)
TRAMPOLINE = 0x7000_0000
TAIL = TRAMPOLINE + 0x40  # the relocated copy of HOT's site: +0, +2, +4, jump back at +6
RETIRED = (TRAMPOLINE, TRAMPOLINE + 0x48)  # a removed patch's trampoline for HOT
OTHER = (TRAMPOLINE + 0x50, TRAMPOLINE + 0x90)  # another retired one
ERESTARTSYS = (1 << 64) - 512
STACK = Mapping(0x7FFF_0000_0000, 0x7FFF_0000_1000, "rw-p", 0, "00:00", 0, "[stack]")


def regs(rip: int, rax: int = 0, orig_rax: int = (1 << 64) - 1, rsp: int = 0) -> UserRegs:
    r = UserRegs()
    r.rip, r.rax, r.orig_rax, r.rsp = rip, rax, orig_rax, rsp
    return r


class FakeMemory:
    def __init__(self, base: int, data: bytes) -> None:
        self.base, self.data = base, data
        self.reads: list[tuple[int, int]] = []

    def read(self, address: int, size: int) -> bytes:
        self.reads.append((address, size))
        assert self.base <= address and address + size <= self.base + len(self.data)
        return self.data[address - self.base : address - self.base + size]


class FakeProc:
    """The parts of StoppedProcess that place_threads and in_use use: registers, memory."""

    def __init__(self, threads: dict[int, UserRegs], stack: bytes = b"") -> None:
        self.threads = threads
        self.memory = FakeMemory(STACK.start, stack.ljust(STACK.size, b"\0"))

    def regs(self, tid: int) -> UserRegs:
        return self.threads[tid]


def place(proc: FakeProc, *entering: Entering) -> list[PendingMove]:
    return place_threads(proc, list(entering)).pending  # type: ignore[arg-type]


def used(proc: FakeProc, *ranges: tuple[int, int]) -> set[int]:
    return in_use(proc, [STACK], list(ranges))  # type: ignore[arg-type]


ENTER_HOT = Entering(HOT_SITE, True, "patchlet[0] at hot")
ENTER_READ = Entering(READ_SITE, True, "patchlet[1] at stuck_read")


def layout(site, tail: int) -> TrampolineLayout:
    """A trampoline whose relocated copy of `site` starts at `tail` (the body before it)."""
    copies = tuple(relocated_addresses(site.instructions, tail))
    return TrampolineLayout(TRAMPOLINE, b"", (TRAMPOLINE, tail), copies, False)


def test_effective_rip_steps_back_over_a_syscall_the_kernel_will_restart() -> None:
    assert effective_rip(regs(READ + 4, ERESTARTSYS, orig_rax=0)) == READ + 2
    assert effective_rip(regs(READ + 4, 3, orig_rax=0)) == READ + 4  # the read returned 3
    assert effective_rip(regs(READ + 4, ERESTARTSYS)) == READ + 4  # not in a system call


def test_threads_outside_or_at_the_first_byte_stay() -> None:
    proc = FakeProc({1: regs(HOT), 2: regs(HOT + 6), 3: regs(0x1234), 4: regs(HOT - 1)})
    assert place(proc, ENTER_HOT) == []


def test_thread_at_a_displaced_instruction_is_moved_into_the_copy() -> None:
    thread = regs(HOT + 4)
    [move] = place(FakeProc({7: thread}), ENTER_HOT)
    assert move == PendingMove(7, 0, 2)  # the second pause
    assert into_copy(move, layout(HOT_SITE, TAIL), thread) == TAIL + 4


def test_thread_in_a_restarting_syscall_goes_to_the_copy_of_its_syscall() -> None:
    stopped = regs(READ + 4, ERESTARTSYS, orig_rax=0)
    [move] = place(FakeProc({9: stopped}), ENTER_HOT, ENTER_READ)
    assert move == PendingMove(9, 1, 1)  # site 1, the syscall instruction
    copy = layout(READ_SITE, 0x9000)
    assert copy.copies[1] == 0x9000 + 2
    # Still in the kernel's restart: rip stays 2 bytes past the syscall, in the copy,
    # so that the kernel's rewind lands on the copied syscall.
    assert into_copy(move, copy, stopped) == 0x9000 + 2 + 2
    # Borrowed for a remote system call, the thread resumes from its continuation,
    # which already re-executes the call: rip is the copied syscall itself.
    borrowed = continuation(stopped)
    assert (borrowed.rip, borrowed.rax) == (READ + 2, 0)
    assert into_copy(move, copy, borrowed) == 0x9000 + 2


def test_thread_whose_syscall_completed_goes_to_the_copy_of_the_next_instruction() -> None:
    """rax = 1 (the read returned): no restart, rip is the `ret` and so is its copy."""
    thread = regs(READ + 4, 1, orig_rax=0)
    [move] = place(FakeProc({9: thread}), ENTER_READ)
    assert move == PendingMove(9, 0, 2)
    copy = layout(READ_SITE, 0x9000)
    assert into_copy(move, copy, thread) == copy.copies[2] == 0x9000 + 4


@pytest.mark.parametrize(
    ("rip", "movable"),
    [(HOT + 2, False), (HOT + 3, True), (HOT + 5, True)],
    ids=["unmovable", "mid-instruction", "mid-pause"],
)
def test_thread_inside_a_site_it_cannot_be_moved_from_is_unsafe(rip: int, movable: bool) -> None:
    enter = Entering(HOT_SITE, movable, "patchlet[0] at hot")
    with pytest.raises(
        Unsafe, match=rf"thread 5 is executing inside patchlet\[0\] at hot \(rip={rip:#x}\)"
    ):
        place(FakeProc({1: regs(0x1234), 5: regs(rip)}), enter)


def test_one_unsafe_thread_makes_the_whole_placement_unsafe() -> None:
    proc = FakeProc({1: regs(HOT + 2), 2: regs(HOT + 3)})
    with pytest.raises(Unsafe, match="thread 2"):
        place(proc, ENTER_HOT)


def test_removal_moves_no_thread_wherever_it_is() -> None:
    """Removal passes no entering site: a thread in the old trampoline's body or
    relocated copy, or at the restored site, stays; the trampoline is kept instead."""
    proc = FakeProc({1: regs(TRAMPOLINE + 8), 2: regs(TAIL + 2), 3: regs(HOT + 2), 4: regs(0x1234)})
    assert place(proc) == []
    assert used(proc, RETIRED) == {0}


def test_update_leaves_a_thread_in_the_old_copy_and_keeps_the_old_trampoline() -> None:
    """A thread in the old patch's copy is not in the new patch's site: it stays, and
    the old trampoline, retired, stays in use while it is there."""
    proc = FakeProc({6: regs(TAIL + 2), 7: regs(HOT + 2)})
    [move] = place(proc, ENTER_HOT)
    assert move == PendingMove(7, 0, 1)  # only the thread in the site itself
    assert used(proc, RETIRED, OTHER) == {0}


def test_in_use_by_instruction_pointer() -> None:
    proc = FakeProc({1: regs(OTHER[0]), 2: regs(RETIRED[1]), 3: regs(0x1234)})
    assert used(proc, RETIRED, OTHER) == {1}  # the end of a range is outside it
    assert used(proc) == set()


def test_in_use_by_a_syscall_the_kernel_will_restart_in_the_range() -> None:
    """A syscall as the last instruction: rip is just past the range, but the kernel
    rewinds into it."""
    end = RETIRED[1]
    assert used(FakeProc({1: regs(end, ERESTARTSYS, orig_rax=0)}), RETIRED) == {0}
    assert used(FakeProc({1: regs(end, 0, orig_rax=0)}), RETIRED) == set()


def test_in_use_by_a_word_on_the_stack_at_or_above_rsp() -> None:
    rsp = STACK.start + 0x100
    words = struct.pack("<4Q", 0x1234, OTHER[0] + 8, 0, RETIRED[1])
    stack = bytes(0x100) + words
    assert used(FakeProc({2: regs(0x1234, rsp=rsp)}, stack), RETIRED, OTHER) == {1}
    # The same word below rsp (already popped) does not count.
    assert used(FakeProc({2: regs(0x1234, rsp=rsp + 16)}, stack), RETIRED, OTHER) == set()
    # A return address at the very top of the stack counts.
    top = bytes(STACK.size - 8) + struct.pack("<Q", RETIRED[0] + 0x20)
    assert used(FakeProc({2: regs(0x1234, rsp=rsp)}, top), RETIRED, OTHER) == {0}


def test_in_use_reads_only_the_thread_s_own_stack() -> None:
    """The scan stops at the end of the mapping holding rsp; a thread whose rsp is in
    no mapping (a corrupt or foreign stack) counts by its instruction pointer only."""
    rsp = STACK.end - 16
    proc = FakeProc({2: regs(0x1234, rsp=rsp)})
    assert used(proc, RETIRED) == set()
    assert proc.memory.reads == [(rsp, 16)]
    lost = FakeProc({3: regs(RETIRED[0], rsp=0x10)})
    assert used(lost, RETIRED) == {0} and lost.memory.reads == []


def test_in_use_scans_a_bounded_stack() -> None:
    huge = Mapping(0x1000_0000, 0x1000_0000 + 4 * STACK_SCAN_LIMIT, "rw-p", 0, "00:00", 0, "")
    proc = FakeProc({1: regs(0x1234, rsp=huge.start)})
    proc.memory = FakeMemory(huge.start, bytes(huge.size))
    assert in_use(proc, [huge], [RETIRED]) == set()  # type: ignore[arg-type]
    assert proc.memory.reads == [(huge.start, STACK_SCAN_LIMIT)]


def test_a_thread_in_the_syscall_stub_makes_the_stop_unsafe() -> None:
    """A patcher killed while it borrowed a thread left it in the stub with a call to
    make (an munmap, say): nothing is decided until it has made it."""
    stub = range(0x403000, 0x403000 + 30)
    pending_call(FakeProc({1: regs(HOT), 2: regs(stub.stop)}), stub)  # type: ignore[arg-type]
    pending_call(FakeProc({1: regs(HOT)}), range(0))  # type: ignore[arg-type]
    for inside in (stub.start, stub.start + 2, stub.stop - 1):  # the syscall, then the pops
        with pytest.raises(Unsafe, match="thread 7 is finishing a system call a killed"):
            pending_call(FakeProc({1: regs(HOT), 7: regs(inside)}), stub)  # type: ignore[arg-type]


@given(
    st.integers(0, (1 << 47) - 1),
    st.integers(1, 1 << 17),
    st.lists(st.integers(0, (1 << 64) - 1) | st.integers(-200, 200), max_size=64),
    st.integers(0, 7),
)
def test_words_within_finds_exactly_the_aligned_words_in_range(
    low: int, size: int, picks: list[int], tail: int
) -> None:
    """The stack scan's search by high bytes finds what decoding every word finds."""
    high = low + size
    words = [p if p > 200 else (low + p * (size // 100 + 1)) % (1 << 64) for p in picks]
    data = struct.pack(f"<{len(words)}Q", *words) + bytes(tail)
    assert sorted(words_within(data, low, high)) == sorted(w for w in words if low <= w < high)
