"""Trampolines: patchlet code, then the displaced instructions, then the way back.

Layout at ``address``::

    [lea rsp,[rsp-128]]   if the body writes the stack: step over the red zone
    body                  the patchlet, assembled where it will run
    [lea rsp,[rsp+128]]
    relocated site + jmp site.end     or     jmp resume

``lea`` moves rsp without touching flags, which the patchlet and the displaced
instructions may depend on.
"""

from __future__ import annotations

from collections.abc import Callable

from iced_x86 import (
    BlockEncoder,
    Code,
    Instruction,
    InstructionInfoFactory,
    MemoryOperand,
    Mnemonic,
    OpAccess,
    Register,
    Register_,
    RegisterExt,
    UsedMemory,
)

from micropatch.arch.base import Site as BaseSite
from micropatch.arch.base import TrampolineLayout
from micropatch.arch.x86_64.constants import RED_ZONE
from micropatch.arch.x86_64.decode import decode, is_invalid
from micropatch.arch.x86_64.jumps import jump
from micropatch.arch.x86_64.relocate import relocate, relocated_addresses
from micropatch.arch.x86_64.site import Site
from micropatch.arch.x86_64.stack import trace

_WRITES = frozenset(
    {OpAccess.WRITE, OpAccess.COND_WRITE, OpAccess.READ_WRITE, OpAccess.READ_COND_WRITE}
)
_INFO = InstructionInfoFactory()
_RSP_UPWARD = frozenset({Mnemonic.POP, Mnemonic.RET})


def _move_rsp(delta: int) -> bytes:
    encoder = BlockEncoder(64)
    encoder.add(
        Instruction.create_reg_mem(
            Code.LEA_R64_M, Register.RSP, MemoryOperand(Register.RSP, displ=delta)
        )
    )
    return encoder.encode(0)


_SKIP_RED_ZONE = _move_rsp(-RED_ZONE)
_RESTORE_RED_ZONE = _move_rsp(RED_ZONE)


def build_trampoline(
    address: int,
    site: BaseSite,
    body_at: Callable[[int], bytes],
    *,
    resume: int | None,
    skip_red_zone: bool,
) -> TrampolineLayout:
    """Build the trampoline to be placed at ``address`` for ``site``.

    ``body_at`` is given the address the patchlet body will start at and
    returns it assembled for that address. With ``resume`` None the displaced
    instructions run after the body and execution continues at ``site.end``;
    otherwise they are skipped and execution continues at ``resume``.
    """
    assert isinstance(site, Site), "an x86-64 trampoline needs an x86-64 site"
    head = _SKIP_RED_ZONE if skip_red_zone else b""
    body_start = address + len(head)
    code = head + body_at(body_start)
    body_end = address + len(code)
    if skip_red_zone:
        code += _RESTORE_RED_ZONE
    tail_address = address + len(code)
    if resume is None:
        code += relocate(site.instructions, tail_address, return_to=site.end)
        copies = tuple(relocated_addresses(site.instructions, tail_address))
    else:
        code += jump(tail_address, resume)
        copies = ()
    return TrampolineLayout(address, code, (body_start, body_end), copies, skip_red_zone)


def writes_stack(code: bytes, address: int) -> bool:
    """True if patchlet ``code`` (at ``address``) may write below its entry rsp or
    move rsp down: such a body must step over the red zone first.

    It follows what the code does (`stack.trace`), not its text: a store through
    a register copied from rsp counts as one through rsp. Pushes, calls, stores
    below the entry rsp, an rsp the trace loses, undecodable bytes, and code
    reached only by a call or a computed jump (judged by its text) all count: the
    red zone is only left in place when that is proven safe.
    """
    found = trace(code, address)
    if found.pushes_below or found.undecodable or found.unknown:
        return True
    for access in found.accesses:
        below = access.offset is None or access.offset < 0
        if access.write and access.anchor == "rsp" and below:
            return True
    return any(
        _may_write_stack(instruction)
        for instruction in decode(code, address)
        if instruction.ip not in found.depths
    )


def _may_write_stack(instruction: Instruction) -> bool:
    """Judged by its text alone: may this instruction write below rsp?"""
    if is_invalid(instruction):
        return True
    if instruction.mnemonic in _RSP_UPWARD:
        return False  # they move rsp up: nothing below the entry rsp is touched
    info = _INFO.info(instruction)
    for register in info.used_registers():
        if _is_rsp(register.register) and register.access in _WRITES:
            return True
    for memory in info.used_memory():
        if _is_rsp(memory.base) and memory.access in _WRITES and not _above_rsp(memory):
            return True
    return False


def _above_rsp(memory: UsedMemory) -> bool:
    """True if an rsp-based operand is at rsp or above it whatever the registers hold."""
    displacement = (
        memory.displacement - (1 << 64) if memory.displacement >> 63 else memory.displacement
    )
    return memory.index == Register.NONE and displacement >= 0


def _is_rsp(register: Register_) -> bool:
    return register != Register.NONE and RegisterExt.full_register(register) == Register.RSP
