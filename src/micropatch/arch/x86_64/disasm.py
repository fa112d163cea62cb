"""Instructions for people: listings with what each instruction refers to."""

from __future__ import annotations

from iced_x86 import OpKind

from micropatch.arch.base import Listed
from micropatch.arch.x86_64.decode import (
    decode,
    format_instruction,
    near_branch_target,
)


def listing(code: bytes, address: int) -> list[Listed]:
    """Every instruction of `code` at `address`, with the addresses it refers to."""
    rows = []
    for ins in decode(code, address):
        refs = []
        target = near_branch_target(ins)
        if target is not None:
            refs.append(target)
        if ins.is_ip_rel_memory_operand:
            refs.append(ins.ip_rel_memory_address)
        if ins.op_count >= 2 and ins.op1_kind == OpKind.IMMEDIATE64:
            refs.append(ins.immediate64)
        raw = code[ins.ip - address : ins.ip - address + ins.len]
        rows.append(Listed(ins.ip, raw, format_instruction(ins), tuple(refs)))
    return rows


def instruction_starts(code: bytes, address: int) -> list[int]:
    """Where each instruction of `code` (decoded linearly at `address`) starts."""
    return [instruction.ip for instruction in decode(code, address)]
