"""Where the stopped threads are, and whether they let us change the code.

A thread inside a site (past its first byte) would resume in the middle of
our jump; one inside a trampoline being freed would resume in freed memory.
Rather than wait for it to leave, a thread stopped exactly at the start of a
displaced instruction is moved to the same instruction in the other copy:
the relocated copy runs it identically, so its state stays valid. Anywhere
else (in a patchlet body, halfway through a rewritten call) it is unsafe,
and the caller resumes the process and tries again later.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from micropatch.arch import Site, TrampolineLayout
from micropatch.arch.x86_64.abi import UserRegs, signed64
from micropatch.live.registry import AppliedSite
from micropatch.process.maps import Mapping, mapping_at
from micropatch.process.world import StoppedProcess

# -ERESTARTSYS, -ERESTARTNOINTR, -ERESTARTNOHAND, -ERESTART_RESTARTBLOCK: on
# resume the kernel moves rip back over the 2-byte `syscall` to run it again.
_RESTARTING = frozenset({-512, -513, -514, -516})
_SYSCALL_LENGTH = 2
STACK_SCAN_LIMIT = 8 << 20
MAX_STEP_OUT = 256  # single-steps to let a thread finish a patchlet body on removal


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
    delta: int  # rip - effective rip: 2 if a system call will be restarted


@dataclass
class Placement:
    moves: dict[int, int]  # tid -> new rip, decided now
    pending: list[PendingMove]


def place_threads(
    proc: StoppedProcess,
    mappings: list[Mapping],
    entering: list[Entering],
    leaving: list[AppliedSite],
    leaving_id: str,
) -> Placement:
    """Decide, for every thread, that it may stay or where it must go; else raise Unsafe."""
    placement = Placement({}, [])
    bodies = [_step_range(old) for old in leaving]

    def in_body(address: int) -> bool:
        return any(low <= address < high for low, high in bodies)

    for tid in proc.threads:
        regs = proc.regs(tid)
        if in_body(regs.rip) and effective_rip(regs) == regs.rip:
            # In a patchlet body, which has no original to move to: let the thread
            # run it, alone. (Never one inside a system call: it may block.)
            if not proc.step_out(tid, in_body, MAX_STEP_OUT):
                raise Unsafe(f"thread {tid} stays in a patchlet body of {leaving_id}")
            regs = proc.regs(tid)
        rip = regs.rip
        eff = effective_rip(regs)
        for old in leaving:
            if old.trampoline <= eff < old.trampoline + old.trampoline_size:
                eff = _out_of_trampoline(tid, eff, old, leaving_id)
                placement.moves[tid] = eff + (rip - effective_rip(regs))
            elif old.address < eff < old.address + len(old.original):
                raise Unsafe(f"thread {tid} is executing inside site {old.address:#x}")
        for index, new in enumerate(entering):
            if new.site.address < eff < new.site.end:
                starts = list(new.site.starts)
                if not new.movable or eff not in starts:
                    raise Unsafe(f"thread {tid} is executing inside {new.where} (rip={eff:#x})")
                placement.moves.pop(tid, None)
                placement.pending.append(
                    PendingMove(tid, index, starts.index(eff), rip - effective_rip(regs))
                )
    if leaving:
        _check_stacks(proc, mappings, leaving, leaving_id)
    return placement


def _step_range(old: AppliedSite) -> tuple[int, int]:
    """Where a thread is run forward rather than moved: the red-zone step, the body,
    and the copy of the first displaced instruction.

    A thread at that first copy has run the body; moved to the site's first byte, it
    would run a body again if a patch were applied there before it executed anything.
    One instruction further, it is moved strictly inside the site instead, where a new
    patch moves it to its own copy, past its body.
    """
    if not old.copies:
        return old.trampoline, old.trampoline + old.trampoline_size
    return old.trampoline, old.copies[1]


def _out_of_trampoline(tid: int, eff: int, old: AppliedSite, patch_id: str) -> int:
    """The original address matching a thread's place in a relocated copy."""
    if old.copies and eff in old.copies:
        originals = [*old.starts, old.address + len(old.original)]
        return originals[old.copies.index(eff)]
    raise Unsafe(f"thread {tid} is executing in a trampoline of {patch_id} (rip={eff:#x})")


def into_copy(move: PendingMove, layout: TrampolineLayout) -> int:
    """The new rip of a pending move, now that the trampoline is laid out."""
    return layout.copies[move.instruction] + move.delta


def _check_stacks(
    proc: StoppedProcess, mappings: list[Mapping], leaving: list[AppliedSite], patch_id: str
) -> None:
    """No return address (or any word) on a thread's stack may point into freed trampolines."""
    freed = [(s.trampoline, s.trampoline + s.trampoline_size) for s in leaving]
    for tid in proc.threads:
        rsp = proc.regs(tid).rsp
        stack = mapping_at(mappings, rsp)
        if stack is None:
            continue
        top = min(stack.end, rsp + STACK_SCAN_LIMIT)
        start = rsp & ~7
        data = proc.memory.read(start, top - start)
        for (word,) in struct.iter_unpack("<Q", data[: len(data) & ~7]):
            for low, high in freed:
                if low <= word < high:
                    raise Unsafe(
                        f"thread {tid} has a return address into a trampoline of {patch_id} "
                        "on its stack"
                    )
