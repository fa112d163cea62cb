"""Decoding and formatting x86-64 machine code.

One place configures iced-x86 so every layer decodes and prints instructions
the same way.
"""

from __future__ import annotations

from iced_x86 import Code, Decoder, Formatter, FormatterSyntax, Instruction, OpKind

_BITNESS = 64

IMMEDIATE_KINDS = frozenset(
    {
        OpKind.IMMEDIATE8,
        OpKind.IMMEDIATE8_2ND,
        OpKind.IMMEDIATE16,
        OpKind.IMMEDIATE32,
        OpKind.IMMEDIATE64,
        OpKind.IMMEDIATE8TO16,
        OpKind.IMMEDIATE8TO32,
        OpKind.IMMEDIATE8TO64,
        OpKind.IMMEDIATE32TO64,
    }
)
"""Every operand kind that is an immediate."""


def _make_formatter() -> Formatter:
    formatter = Formatter(FormatterSyntax.INTEL)
    # Show RIP-relative operands as written ([rip+0x10]) rather than as the
    # resolved address: that is what a patch author compares with objdump -M intel.
    formatter.rip_relative_addresses = True
    formatter.hex_prefix = "0x"
    formatter.hex_suffix = ""
    formatter.uppercase_hex = False
    formatter.branch_leading_zeros = False
    formatter.show_branch_size = False
    return formatter


_FORMATTER = _make_formatter()


def decode(code: bytes, address: int) -> list[Instruction]:
    """Decode ``code`` linearly as 64-bit instructions, the first at ``address``.

    Undecodable bytes come back as instructions whose ``code`` is
    ``Code.INVALID`` rather than an exception, so a caller can report where the
    sweep went wrong (see :func:`is_invalid`).
    """
    return list(Decoder(_BITNESS, code, ip=address))


def is_invalid(instruction: Instruction) -> bool:
    """True if the decoder could not make an instruction of these bytes."""
    return instruction.code == Code.INVALID


def format_instruction(instruction: Instruction) -> str:
    """Intel-syntax text of one instruction, e.g. ``mov rax,[rip+0x1234]``."""
    if is_invalid(instruction):
        return "(bad)"
    return _FORMATTER.format(instruction)


def near_branch_target(instruction: Instruction) -> int | None:
    """Target of a direct jmp/jcc/call/loop/jrcxz/xbegin, or None if it has none."""
    # In 64-bit code every relative branch operand decodes as NEAR_BRANCH64.
    for operand in range(instruction.op_count):
        if instruction.op_kind(operand) == OpKind.NEAR_BRANCH64:
            return instruction.near_branch_target
    return None


def is_call(instruction: Instruction) -> bool:
    """True for a call, which pushes the address after it as a return address.

    ``syscall`` is not one, although iced classes its flow control as a call:
    it returns to whatever follows it, wherever that is.
    """
    # A direct far call does not exist in 64-bit code.
    return (
        instruction.is_call_near
        or instruction.is_call_near_indirect
        or instruction.is_call_far_indirect
    )
