"""Unwinding a stack frame with a loaded module's call frame information.

`frame_rule` finds the FDE covering a pc through `.eh_frame_hdr` (a binary
search in the image the loader mapped, never the whole `.eh_frame`) and runs
its CFA program up to the pc; `caller` applies the rule to a thread's
registers. Only what compilers emit for ordinary code is understood
(register + offset CFAs, registers saved at CFA offsets); anything else, such
as a DWARF expression, raises `CfiUnsupported`, and the caller treats the
frame as unknown.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

from micropatch.elf.loaded import PT_GNU_EH_FRAME, LoadedImage
from micropatch.errors import ElfError

Reader = Callable[[int, int], bytes]

RSP, RBP, RA = 7, 6, 16
# DWARF register number -> user_regs_struct field, for what a CFA or a saved register uses.
DWARF_REGS = {0: "rax", 1: "rdx", 2: "rcx", 3: "rbx", 4: "rsi", 5: "rdi", 6: "rbp", 7: "rsp",
              **{n: f"r{n}" for n in range(8, 16)}}  # fmt: skip
_MAX_INSTRUCTIONS = 4096


class CfiUnsupported(ElfError):
    """The frame's unwind rule is missing or beyond what we evaluate."""


@dataclass
class FrameRule:
    """How to find the caller's frame at one pc: CFA = register + offset; each saved
    register (and the return address, RA) at CFA + its offset."""

    cfa_register: int = RSP
    cfa_offset: int = 8
    saved: dict[int, int] = field(default_factory=dict)


@dataclass
class _Cie:
    code_align: int
    data_align: int
    ra_register: int
    fde_encoding: int
    initial: bytes
    signal_frame: bool


class _Cursor:
    def __init__(self, data: bytes, address: int) -> None:
        self.data, self.address, self.pos = data, address, 0

    def u(self, fmt: str) -> int:
        value: int = struct.unpack_from("<" + fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def uleb(self) -> int:
        result = shift = 0
        while True:
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    def sleb(self) -> int:
        result = shift = 0
        while True:
            byte = self.data[self.pos]
            self.pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result - (1 << shift) if byte & 0x40 else result

    def encoded(self, encoding: int, data_base: int = 0) -> int:
        here = self.address + self.pos
        kind = encoding & 0x0F
        value: int
        formats = {0x01: "Q", 0x02: "H", 0x03: "I", 0x04: "Q", 0x0A: "h", 0x0B: "i", 0x0C: "q"}
        if kind == 0x00:
            value = self.u("Q")
        elif kind in formats:
            value = self.u(formats[kind])
        elif kind == 0x09:
            value = self.sleb()
        else:
            raise CfiUnsupported(f"pointer encoding {encoding:#x}")
        application = encoding & 0x70
        if application == 0x10:
            value += here
        elif application == 0x30:
            value += data_base
        elif application:
            raise CfiUnsupported(f"pointer encoding {encoding:#x}")
        return value & ((1 << 64) - 1)


def _fde_for(image: LoadedImage, pc: int) -> int:
    header = image.segment(PT_GNU_EH_FRAME)
    if header is None:
        raise CfiUnsupported(f"{image.name} has no .eh_frame_hdr")
    hdr = image.bias + header.vaddr
    cursor = _Cursor(image.read(hdr, 16), hdr)
    version, ptr_enc, count_enc, table_enc = (cursor.u("B") for _ in range(4))
    if version != 1 or table_enc != 0x3B:  # datarel | sdata4: what every linker writes
        raise CfiUnsupported(f"{image.name}: .eh_frame_hdr table encoding {table_enc:#x}")
    cursor.encoded(ptr_enc, hdr)
    count = cursor.encoded(count_enc, hdr)
    table = hdr + cursor.pos
    low, high = 0, count - 1
    found: int | None = None
    while low <= high:  # the last entry whose initial location is <= pc
        middle = (low + high) // 2
        start: int
        fde: int
        start, fde = struct.unpack("<ii", image.read(table + 8 * middle, 8))
        if hdr + start <= pc:
            found, low = hdr + fde, middle + 1
        else:
            high = middle - 1
    if found is None:
        raise CfiUnsupported(f"no FDE for {pc:#x} in {image.name}")
    return found


def _record(read: Reader, address: int) -> _Cursor:
    length: int = struct.unpack("<I", read(address, 4))[0]
    if length in (0, 0xFFFFFFFF) or length > 1 << 20:
        raise CfiUnsupported(f"CFI record at {address:#x} of length {length:#x}")
    return _Cursor(read(address + 4, length), address + 4)


def _cie(read: Reader, address: int) -> _Cie:
    cursor = _record(read, address)
    if cursor.u("I") != 0 or cursor.u("B") not in (1, 3):
        raise CfiUnsupported(f"not a CIE at {address:#x}")
    end = cursor.data.index(b"\0", cursor.pos)
    augmentation = cursor.data[cursor.pos : end].decode("ascii", "replace")
    cursor.pos = end + 1
    code_align, data_align, ra = cursor.uleb(), cursor.sleb(), cursor.uleb()
    encoding, signal = 0, False
    if augmentation.startswith("z"):
        length = cursor.uleb()
        after = cursor.pos + length
        for letter in augmentation[1:]:
            if letter == "R":
                encoding = cursor.u("B")
            elif letter == "P":
                cursor.encoded(cursor.u("B"))
            elif letter == "L":
                cursor.u("B")
            elif letter == "S":
                signal = True
        cursor.pos = after
    elif augmentation:
        raise CfiUnsupported(f"CIE augmentation {augmentation!r}")
    return _Cie(code_align, data_align, ra, encoding, cursor.data[cursor.pos :], signal)


def frame_rule(image: LoadedImage, pc: int) -> tuple[int, FrameRule]:
    """The start of the function containing `pc` (its FDE's initial location) and
    the unwind rule in force at `pc`."""
    fde_address = _fde_for(image, pc)
    cursor = _record(image.read, fde_address)
    cie = _cie(image.read, cursor.address - cursor.u("I"))
    if cie.signal_frame or cie.ra_register != RA:
        raise CfiUnsupported(f"a signal frame or unusual return column at {pc:#x}")
    start = cursor.encoded(cie.fde_encoding)
    size = cursor.encoded(cie.fde_encoding & 0x0F)
    if not start <= pc < start + size:
        raise CfiUnsupported(f"no FDE covers {pc:#x} in {image.name}")
    cursor.pos += cursor.uleb()  # augmentation data (the LSDA pointer)
    initial = FrameRule()
    rule = _run(cie.initial, initial, cie, start, pc, None)
    initial = FrameRule(rule.cfa_register, rule.cfa_offset, dict(rule.saved))
    return start, _run(cursor.data[cursor.pos :], rule, cie, start, pc, initial)


def _run(
    program: bytes, rule: FrameRule, cie: _Cie, location: int, pc: int, initial: FrameRule | None
) -> FrameRule:
    cursor = _Cursor(program, 0)
    stack: list[FrameRule] = []
    for _ in range(_MAX_INSTRUCTIONS):
        if cursor.pos >= len(program):
            return rule
        op = cursor.u("B")
        high, low = op & 0xC0, op & 0x3F
        advance = None
        if high == 0x40:
            advance = low
        elif high == 0x80:
            rule.saved[low] = cursor.uleb() * cie.data_align
        elif high == 0xC0:
            _restore(rule, initial, low)
        elif op == 0x00:
            pass
        elif op in (0x02, 0x03, 0x04):
            advance = cursor.u({0x02: "B", 0x03: "H", 0x04: "I"}[op])
        elif op in (0x05, 0x11):
            reg = cursor.uleb()
            offset = cursor.uleb() if op == 0x05 else cursor.sleb()
            rule.saved[reg] = offset * cie.data_align
        elif op == 0x06:
            _restore(rule, initial, cursor.uleb())
        elif op in (0x07, 0x08):
            rule.saved.pop(cursor.uleb(), None)
        elif op == 0x0A:
            stack.append(FrameRule(rule.cfa_register, rule.cfa_offset, dict(rule.saved)))
        elif op == 0x0B:
            if not stack:
                raise CfiUnsupported("DW_CFA_restore_state without remember_state")
            rule = stack.pop()
        elif op in (0x0C, 0x12):
            rule.cfa_register = cursor.uleb()
            rule.cfa_offset = cursor.uleb() if op == 0x0C else cursor.sleb() * cie.data_align
        elif op == 0x0D:
            rule.cfa_register = cursor.uleb()
        elif op in (0x0E, 0x13):
            rule.cfa_offset = cursor.uleb() if op == 0x0E else cursor.sleb() * cie.data_align
        elif op == 0x2E:
            cursor.uleb()  # DW_CFA_GNU_args_size
        else:
            raise CfiUnsupported(f"CFA instruction {op:#x}")
        if advance is not None:
            location += advance * cie.code_align
            if location > pc:
                return rule
    raise CfiUnsupported("CFA program too long")


def _restore(rule: FrameRule, initial: FrameRule | None, reg: int) -> None:
    if initial is not None and reg in initial.saved:
        rule.saved[reg] = initial.saved[reg]
    else:
        rule.saved.pop(reg, None)


def caller(read: Reader, rule: FrameRule, regs: dict[str, int]) -> dict[str, int]:
    """The caller's registers (rip, rsp and the callee-saved ones the frame saved)
    from the callee's `regs` at the pc the rule was computed for."""
    name = DWARF_REGS.get(rule.cfa_register)
    if name is None or RA not in rule.saved:
        raise CfiUnsupported(f"CFA in DWARF register {rule.cfa_register}, or no return address")
    cfa = (regs[name] + rule.cfa_offset) & ((1 << 64) - 1)
    out = dict(regs)
    for reg, offset in rule.saved.items():
        value: int = struct.unpack("<Q", read(cfa + offset, 8))[0]
        if reg == RA:
            out["rip"] = value
        elif reg in DWARF_REGS:
            out[DWARF_REGS[reg]] = value
    out["rsp"] = cfa
    return out
