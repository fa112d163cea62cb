"""Where stopped threads may stay or must go, decided from plain registers and bytes.

A fake stopped process holds registers and memory; the decisions are the real ones.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from micropatch.arch import TrampolineLayout
from micropatch.arch.x86_64.abi import UserRegs
from micropatch.arch.x86_64.relocate import relocated_addresses
from micropatch.arch.x86_64.site import plan_site
from micropatch.live.registry import AppliedSite
from micropatch.live.safety import (
    Entering,
    PendingMove,
    Unsafe,
    effective_rip,
    into_copy,
    place_threads,
)
from micropatch.process.maps import Mapping

HOT = 0x401000  # mov eax,edi; pause; pause | lea; ret  (tests/targets/spinner_asm.S)
HOT_SITE = plan_site(bytes.fromhex("89f8f390f3908d444001c3"), HOT, HOT)
READ = 0x402000  # xor eax,eax; syscall; ret
READ_SITE = plan_site(bytes.fromhex("31c00f05c3"), READ, READ)
TRAMPOLINE = 0x7000_0000
TAIL = TRAMPOLINE + 0x40  # the relocated copy of HOT's site: +0, +2, +4, jump back at +6
ERESTARTSYS = (1 << 64) - 512
STACK = Mapping(0x7FFF_0000_0000, 0x7FFF_0000_1000, "rw-p", 0, "00:00", 0, "[stack]")


def regs(rip: int, rax: int = 0, orig_rax: int = (1 << 64) - 1, rsp: int = 0) -> UserRegs:
    r = UserRegs()
    r.rip, r.rax, r.orig_rax, r.rsp = rip, rax, orig_rax, rsp
    return r


class FakeMemory:
    def __init__(self, base: int, data: bytes) -> None:
        self.base, self.data = base, data

    def read(self, address: int, size: int) -> bytes:
        return self.data[address - self.base : address - self.base + size]


class FakeProc:
    """The parts of StoppedProcess that place_threads uses."""

    def __init__(
        self,
        threads: dict[int, UserRegs],
        stack: bytes = b"",
        step: Callable[[int], UserRegs | None] | None = None,
    ) -> None:
        self.threads = threads
        self.memory = FakeMemory(STACK.start, stack.ljust(STACK.size, b"\0"))
        self._step = step
        self.stepped: list[int] = []

    def regs(self, tid: int) -> UserRegs:
        return self.threads[tid]

    def step_out(self, tid: int, inside: Callable[[int], bool], max_steps: int) -> bool:
        self.stepped.append(tid)
        after = self._step(tid) if self._step else None
        if after is None:
            return False
        self.threads[tid] = after
        return not inside(after.rip)


def place(proc: FakeProc, entering=(), leaving=(), mappings=()):
    return place_threads(proc, list(mappings), list(entering), list(leaving), "fix-1")  # type: ignore[arg-type]


ENTER_HOT = Entering(HOT_SITE, True, "patchlet[0] at hot")
def layout(site, tail: int) -> TrampolineLayout:
    """A trampoline whose relocated copy of `site` starts at `tail` (the body before it)."""
    copies = tuple(relocated_addresses(site.instructions, tail))
    return TrampolineLayout(TRAMPOLINE, b"", (TRAMPOLINE, tail), copies, False)


HOT_APPLIED = AppliedSite(
    0,
    HOT,
    HOT_SITE.original,
    b"\xe9" + bytes(4) + b"\xcc",
    TRAMPOLINE,
    0x48,
    TAIL,
    copies=list(layout(HOT_SITE, TAIL).copies),
    body=[TRAMPOLINE, TAIL],
    starts=list(HOT_SITE.starts),
)


def test_effective_rip_steps_back_over_a_syscall_the_kernel_will_restart() -> None:
    assert effective_rip(regs(READ + 4, ERESTARTSYS, orig_rax=0)) == READ + 2
    assert effective_rip(regs(READ + 4, 3, orig_rax=0)) == READ + 4  # the read returned 3
    assert effective_rip(regs(READ + 4, ERESTARTSYS)) == READ + 4  # not in a system call


def test_threads_outside_or_at_the_first_byte_stay() -> None:
    proc = FakeProc({1: regs(HOT), 2: regs(HOT + 6), 3: regs(0x1234)})
    placement = place(proc, [ENTER_HOT])
    assert (placement.moves, placement.pending) == ({}, [])


def test_thread_at_a_displaced_instruction_is_moved_into_the_copy() -> None:
    placement = place(FakeProc({7: regs(HOT + 4)}), [ENTER_HOT])
    assert placement.moves == {}
    assert placement.pending == [PendingMove(7, 0, 2, 0)]
    assert into_copy(placement.pending[0], layout(HOT_SITE, TAIL)) == TAIL + 4


def test_thread_in_a_restarting_syscall_keeps_its_offset_in_the_copy() -> None:
    enter = Entering(READ_SITE, True, "patchlet[1] at stuck_read")
    placement = place(FakeProc({9: regs(READ + 4, ERESTARTSYS, orig_rax=0)}), [ENTER_HOT, enter])
    [move] = placement.pending
    assert move == PendingMove(9, 1, 1, 2)  # the syscall instruction, rip 2 bytes past it
    assert into_copy(move, layout(READ_SITE, 0x9000)) == 0x9000 + 2 + 2


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
        place(FakeProc({5: regs(rip)}), [enter])


@pytest.mark.parametrize(
    ("copy", "original"), [(TAIL + 2, HOT + 2), (TAIL + 4, HOT + 4), (TAIL + 6, HOT + 6)]
)
def test_removal_moves_threads_from_the_copy_back_to_the_original(copy: int, original: int) -> None:
    placement = place(FakeProc({3: regs(copy)}), leaving=[HOT_APPLIED])
    assert placement.moves == {3: original} and placement.pending == []


def test_removal_runs_a_thread_out_of_the_body_then_moves_it() -> None:
    proc = FakeProc({3: regs(TRAMPOLINE + 8)}, step=lambda tid: regs(TAIL + 2))
    assert place(proc, leaving=[HOT_APPLIED]).moves == {3: HOT + 2}
    assert proc.stepped == [3]


def test_removal_is_unsafe_while_a_thread_stays_in_the_body() -> None:
    proc = FakeProc({3: regs(TRAMPOLINE + 8)})
    with pytest.raises(Unsafe, match="thread 3 stays in a patchlet body of fix-1"):
        place(proc, leaving=[HOT_APPLIED])


def test_a_thread_in_a_system_call_in_the_body_is_never_stepped() -> None:
    proc = FakeProc(
        {3: regs(TRAMPOLINE + 10, ERESTARTSYS, orig_rax=0)}, step=lambda tid: regs(TAIL)
    )
    with pytest.raises(
        Unsafe, match=r"thread 3 is executing in a trampoline of fix-1 \(rip=0x70000008\)"
    ):
        place(proc, leaving=[HOT_APPLIED])
    assert proc.stepped == []


def test_removal_is_unsafe_for_a_thread_inside_the_patched_site() -> None:
    with pytest.raises(Unsafe, match=rf"thread 4 is executing inside site {HOT:#x}"):
        place(FakeProc({4: regs(HOT + 2)}), leaving=[HOT_APPLIED])


def test_removal_is_unsafe_with_a_return_address_into_the_trampoline() -> None:
    rsp = STACK.start + 0x100
    words = struct.pack("<4Q", 0, 0x1234, TRAMPOLINE + 0x20, 0)
    stack = bytes(0x100) + words
    with pytest.raises(Unsafe, match="thread 2 has a return address into a trampoline of fix-1"):
        place(FakeProc({2: regs(0x1234, rsp=rsp)}, stack), leaving=[HOT_APPLIED], mappings=[STACK])
    # The same word below rsp (already popped) does not count.
    clean = place(
        FakeProc({2: regs(0x1234, rsp=rsp + 32)}, stack), leaving=[HOT_APPLIED], mappings=[STACK]
    )
    assert clean.moves == {}


def test_update_moves_a_thread_from_the_old_copy_into_the_new_one() -> None:
    """A thread in the old copy maps back to the original instruction, which the new
    patch displaces too: the pending move into the new copy wins."""
    placement = place(FakeProc({6: regs(TAIL + 2)}), [ENTER_HOT], [HOT_APPLIED])
    assert placement.moves == {} and placement.pending == [PendingMove(6, 0, 1, 0)]
