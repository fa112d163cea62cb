"""Moving displaced instructions to a trampoline so they behave as if unmoved.

iced's BlockEncoder re-encodes each instruction at its new address: it turns
short branches into near ones, rewrites ``jrcxz``/``loop`` (which have no near
form) as ``jrcxz +2; jmp short +5; jmp near target``, and recomputes
RIP-relative displacements. A displaced ``call`` is rewritten by hand so that
it pushes the *original* return address.
"""

from __future__ import annotations

from collections.abc import Sequence

from iced_x86 import (
    BlockEncoder,
    Code,
    Instruction,
    MemoryOperand,
    OpKind,
    Register,
    RegisterExt,
)

from micropatch.arch.x86_64.constants import JUMP_REACH
from micropatch.arch.x86_64.decode import format_instruction, is_call, near_branch_target
from micropatch.arch.x86_64.jumps import jump
from micropatch.errors import RelocationError

_JMP_RIP_INDIRECT = b"\xff\x25\x00\x00\x00\x00"  # jmp [rip+0]; the 8-byte target follows
# A relocated instruction's rel32 is measured from less than 16 bytes past its
# start (an instruction is at most 15 bytes, a rewritten loop 10), so checking
# reach from the start with this margin is exact enough, and it keeps
# BlockEncoder from silently falling back to absolute forms.
_REACH = JUMP_REACH - 32
_MASK64 = 2**64 - 1


def relocate(instructions: Sequence[Instruction], new_address: int, *, return_to: int) -> bytes:
    """Re-encode ``instructions`` to run at ``new_address``, then jump to ``return_to``.

    Branch targets and RIP-relative operands keep pointing at their original
    addresses, so control and data flow exactly as before the move; a ``call``
    pushes the address after it in the original code, which a planned site
    guarantees is its end. The jump back is appended even after a final
    ``jmp``/``ret``, where it is unreachable, so the layout never depends on
    the instructions.
    """
    code = b"".join(_encoded(instructions, new_address))
    return code + jump(new_address + len(code), return_to)


def relocated_addresses(instructions: Sequence[Instruction], new_address: int) -> list[int]:
    """Where each instruction's copy starts when relocated to ``new_address``, then
    where the jump back starts: the map that lets a stopped thread move between the
    original instructions and their copy."""
    addresses = [new_address]
    for piece in _encoded(instructions, new_address):
        addresses.append(addresses[-1] + len(piece))
    return addresses


def _encoded(instructions: Sequence[Instruction], new_address: int) -> list[bytes]:
    pieces: list[bytes] = []
    at = new_address
    for instruction in instructions:
        if is_call(instruction):
            piece = _relocate_call(instruction, at)
        else:
            _check_reach(instruction, at)
            piece = _encode(instruction, at, instruction)
        pieces.append(piece)
        at += len(piece)
    return pieces


def _relocate_call(call: Instruction, at: int) -> bytes:
    """``push <original return address>; jmp <call target>``, flags untouched.

    The return address must be the original one so that stacks, unwinders and
    C++ exceptions see the original function, and so that removing the patch
    never leaves a return address into a freed cave.
    """
    code = bytearray()
    for instruction in (
        Instruction.create_reg(Code.PUSH_R64, Register.RAX),
        Instruction.create_reg_u64(Code.MOV_R64_IMM64, Register.RAX, call.next_ip),
        Instruction.create_mem_reg(Code.XCHG_RM64_R64, MemoryOperand(Register.RSP), Register.RAX),
    ):
        code += _encode(instruction, at + len(code), call)
    at += len(code)
    target = near_branch_target(call)
    if target is None:
        _check_reach(call, at)
        code += _encode(_indirect_jump(call), at, call)
    elif -_REACH <= target - at <= _REACH:
        code += jump(at, target)
    else:
        # A call may reach anything; the absolute form keeps that true from any cave.
        code += _JMP_RIP_INDIRECT + target.to_bytes(8, "little")
    return bytes(code)


def _indirect_jump(call: Instruction) -> Instruction:
    """The ``jmp r/m64`` that goes where ``call r/m64`` went, after our push."""
    if call.code != Code.CALL_RM64:
        raise RelocationError(
            f"cannot relocate {format_instruction(call)} at {call.ip:#x}: only near "
            "64-bit calls can be relocated"
        )
    jmp = call.copy()
    jmp.code = Code.JMP_RM64
    if call.op0_kind == OpKind.REGISTER:
        reads_rsp = RegisterExt.full_register(call.op0_register) == Register.RSP
    elif call.memory_base == Register.RSP:
        # The pushed return address moved rsp down by 8.
        jmp.memory_displacement = (call.memory_displacement + 8) & _MASK64
        reads_rsp = False
    else:
        reads_rsp = call.memory_base == Register.ESP  # 32-bit addressing: too rare to adjust
    if reads_rsp:
        raise RelocationError(
            f"cannot relocate {format_instruction(call)} at {call.ip:#x}: its target "
            "depends on rsp, which the relocated push changes"
        )
    return jmp


def _check_reach(instruction: Instruction, at: int) -> None:
    """Refuse an instruction whose relative operand cannot be encoded at ``at``."""
    targets = [near_branch_target(instruction)]
    if instruction.is_ip_rel_memory_operand:
        targets.append(instruction.ip_rel_memory_address)
    for target in targets:
        if target is not None and not -_REACH <= target - at <= _REACH:
            raise RelocationError(
                f"cannot relocate {format_instruction(instruction)} from {instruction.ip:#x} "
                f"to {at:#x}: it refers to {target:#x}, more than 2 GiB away; the cave "
                "must be mapped within 2 GiB of the module"
            )


def _encode(instruction: Instruction, at: int, origin: Instruction) -> bytes:
    """Encode ``instruction`` at ``at``; ``origin`` is the displaced one it stands for.

    BlockEncoder sends a branch whose target is the ``ip`` of an instruction in
    its block to the new copy of that instruction. Giving the copy its new
    address as ``ip`` keeps a branch back to the site's first byte going to the
    original address, through the patch jump like any other branch there.
    """
    moved = instruction.copy()
    moved.ip = at
    encoder = BlockEncoder(64)
    encoder.add(moved)
    try:
        return encoder.encode(at)
    except ValueError as error:
        raise RelocationError(
            f"cannot relocate {format_instruction(origin)} from {origin.ip:#x} to {at:#x}: {error}"
        ) from error
