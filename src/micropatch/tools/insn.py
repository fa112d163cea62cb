"""The one seam between the author tools and the x86-64 layer.

Every other module of tools/ takes its decoding, formatting and site planning
from here, so moving the architecture code is a change to this file alone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from iced_x86 import Code, FlowControl, Instruction, Mnemonic, OpKind, Register, RegisterExt

from micropatch.arch.x86_64.decode import IMMEDIATE_KINDS

if TYPE_CHECKING:
    from iced_x86._iced_x86_py import Register as RegisterValue

from micropatch.arch.x86_64.decode import decode, format_instruction, is_call, near_branch_target
from micropatch.arch.x86_64.site import Site, plan_site

__all__ = [
    "Instruction",
    "Site",
    "decode",
    "ends_flow",
    "format_instruction",
    "is_call",
    "is_conditional",
    "is_padding",
    "near_branch_target",
    "plan_site",
    "summarise",
]



def _register_classes() -> dict[int, object]:
    """Registers a compiler allocates freely (callee-saved, r10/r11, vectors) map to
    their class and size; the ABI's argument, return and stack registers stay."""
    free = {Register.RBX, Register.RBP, Register.R10, Register.R11}
    free |= {Register.R12, Register.R13, Register.R14, Register.R15}
    classes: dict[int, object] = {}
    for name in dir(Register):
        value = getattr(Register, name)
        if not isinstance(value, int) or name.startswith("_"):
            continue
        register = cast("RegisterValue", value)
        if RegisterExt.is_gpr(register) and RegisterExt.full_register(register) in free:
            classes[register] = ("g", RegisterExt.size(register))
        elif RegisterExt.is_vector_register(register):
            classes[register] = ("v", RegisterExt.size(register))
    return classes


# Read-only after import.
_REGISTER_CLASS = _register_classes()
_SIGN_EXTENDED = frozenset({OpKind.IMMEDIATE8TO64, OpKind.IMMEDIATE32TO64})
_SIGNED_64 = 1 << 64
_ENDS_FLOW = frozenset(
    {
        FlowControl.UNCONDITIONAL_BRANCH,
        FlowControl.INDIRECT_BRANCH,
        FlowControl.RETURN,
        FlowControl.EXCEPTION,
        FlowControl.INTERRUPT,
    }
)


def is_conditional(instruction: Instruction) -> bool:
    """True for a conditional branch (jcc, loop, jrcxz)."""
    return instruction.flow_control == FlowControl.CONDITIONAL_BRANCH


def ends_flow(instruction: Instruction) -> bool:
    """True if execution never falls through to the next instruction (jmp, ret, ud2)."""
    return instruction.flow_control in _ENDS_FLOW


def is_padding(instruction: Instruction) -> bool:
    """True for the no-ops compilers put between blocks for alignment."""
    return instruction.mnemonic == Mnemonic.NOP or instruction.code == Code.XCHG_R16_AX


def summarise(
    instruction: Instruction, small: int
) -> tuple[tuple[object, ...], int | None, list[int]]:
    """One pass over the operands: (shape, near branch target, immediates).

    The shape is the instruction stripped of what moves between builds:
    registers a compiler allocates freely become their class (ABI registers
    stay); immediates stay if their magnitude is below `small`; memory
    operands keep base, index and scale, and a small displacement unless it
    is into the stack frame. Branch targets and RIP-relative addresses are
    left out: the caller adds what they refer to (a string, an import), which
    survives a rebuild.
    """
    classes = _REGISTER_CLASS
    parts: list[object] = [instruction.mnemonic]
    target = None
    values = []
    for operand in range(instruction.op_count):
        kind = instruction.op_kind(operand)
        if kind == OpKind.REGISTER:
            register = instruction.op_register(operand)
            parts.append(classes.get(register, register))
        elif kind == OpKind.MEMORY:
            base = instruction.memory_base
            if base == Register.RIP:
                parts.append("m")
            else:
                displacement = instruction.memory_displacement
                if displacement >= 1 << 63:
                    displacement -= _SIGNED_64
                index = instruction.memory_index
                parts.append(
                    (
                        classes.get(base, base),
                        classes.get(index, index),
                        instruction.memory_index_scale,
                        "s"
                        if base == Register.RSP
                        else displacement
                        if -small < displacement < small
                        else "d",
                    )
                )
        elif kind in IMMEDIATE_KINDS:
            value = instruction.immediate(operand)
            if kind in _SIGN_EXTENDED and value >= 1 << 63:
                value -= _SIGNED_64
            values.append(value)
            parts.append(value if -small < value < small else "i")
        elif kind == OpKind.NEAR_BRANCH64:
            target = instruction.near_branch_target
            parts.append("b")
        else:
            parts.append(kind)
    return tuple(parts), target, values
