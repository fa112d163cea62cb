"""A small unicorn harness: run code until control leaves it, then snapshot.

Used to check relocated code against the original by behaviour rather than by
its bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from keystone import KS_ARCH_X86, KS_MODE_64, Ks
from unicorn import UC_ARCH_X86, UC_HOOK_CODE, UC_MODE_64, Uc
from unicorn import x86_const as x86

PAGE = 0x1000
REGISTERS = {
    "rax": x86.UC_X86_REG_RAX,
    "rbx": x86.UC_X86_REG_RBX,
    "rcx": x86.UC_X86_REG_RCX,
    "rdx": x86.UC_X86_REG_RDX,
    "rsi": x86.UC_X86_REG_RSI,
    "rdi": x86.UC_X86_REG_RDI,
    "rbp": x86.UC_X86_REG_RBP,
    "rsp": x86.UC_X86_REG_RSP,
    "r8": x86.UC_X86_REG_R8,
    "r9": x86.UC_X86_REG_R9,
    "r10": x86.UC_X86_REG_R10,
    "r11": x86.UC_X86_REG_R11,
    "r12": x86.UC_X86_REG_R12,
    "r13": x86.UC_X86_REG_R13,
    "r14": x86.UC_X86_REG_R14,
    "r15": x86.UC_X86_REG_R15,
    "rflags": x86.UC_X86_REG_EFLAGS,
}
_KS = Ks(KS_ARCH_X86, KS_MODE_64)


def asm(source: str, address: int) -> bytes:
    """Assemble Intel-syntax ``source`` as if placed at ``address``."""
    encoding, _ = _KS.asm(source, address)
    return bytes(encoding)


@dataclass(frozen=True)
class Outcome:
    """Where control left the code, and the machine state at that moment."""

    exit: int
    registers: dict[str, int]
    memory: dict[int, bytes]


def run(
    memory: Mapping[int, bytes],
    start: int,
    end: int,
    registers: Mapping[str, int],
    watch: Sequence[tuple[int, int]] = (),
    *,
    low: int | None = None,
) -> Outcome:
    """Run from ``start`` until the first instruction outside [low, end).

    ``low`` defaults to ``start``. ``memory`` maps page-aligned addresses to
    their contents (mapped RWX); ``watch`` lists (address, size) ranges to
    snapshot at the exit.
    """
    low = start if low is None else low
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    for address, content in memory.items():
        assert address % PAGE == 0, hex(address)
        uc.mem_map(address, -(-len(content) // PAGE) * PAGE)
        uc.mem_write(address, content)
    for name, value in registers.items():
        uc.reg_write(REGISTERS[name], value)
    exits: list[int] = []

    def leave(emulator: Any, address: int, size: int, user_data: Any) -> None:
        if not low <= address < end:
            exits.append(address)
            emulator.emu_stop()

    uc.hook_add(UC_HOOK_CODE, leave)
    uc.emu_start(start, 2**64 - 1, count=1000)
    assert exits, f"code at {start:#x} never left [{low:#x}, {end:#x})"
    return Outcome(
        exit=exits[0],
        registers={name: uc.reg_read(register) for name, register in REGISTERS.items()},
        memory={address: bytes(uc.mem_read(address, size)) for address, size in watch},
    )
