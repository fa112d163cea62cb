"""Decoding and the Intel-syntax text other layers show to patch authors."""

from __future__ import annotations

from micropatch.arch.x86_64.decode import decode, format_instruction

from .emulator import asm


def test_decode_is_linear_from_the_address() -> None:
    code = asm("push rbp; mov rax, qword ptr [rip+0x1234]; jne 0x1000; ret", 0x1000)
    instructions = decode(code, 0x1000)
    assert [instruction.ip for instruction in instructions] == [0x1000, 0x1001, 0x1008, 0x100A]
    assert [format_instruction(instruction) for instruction in instructions] == [
        "push rbp",
        "mov rax,[rip+0x1234]",
        "jne 0x1000",
        "ret",
    ]


def test_undecodable_bytes_format_as_bad() -> None:
    (instruction,) = decode(b"\x06", 0x1000)  # push es: invalid in 64-bit mode
    assert format_instruction(instruction) == "(bad)"
