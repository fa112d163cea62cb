""".eh_frame read directly: every FDE's address range, and the CFA rule at an address.

pyelftools decodes every call-frame instruction of every entry to list the
ranges, 1.6 s on a 5 MB library; the tools and the planner need only the FDE
headers, and the CFA rule at one address. This reader parses the headers of
the entries (CIE augmentations, pointer encodings), and runs the call-frame
program of one FDE on demand, tracking only the CFA rule (register + offset),
which is what locates the return address (at CFA - 8 on x86-64).

Everything is bounds-checked: a malformed section raises `EhFrameError`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# DWARF register numbers (System V x86-64 psABI, figure 3.36).
DWARF_RSP = 7
DWARF_RBP = 6
REGISTER_NAMES = {DWARF_RSP: "rsp", DWARF_RBP: "rbp"}

# Pointer encodings (DW_EH_PE_*): format in the low nibble, application in the high.
_PE_OMIT = 0xFF
_PE_FORMATS = {
    0x00: ("<Q", 8),  # absptr
    0x02: ("<H", 2),
    0x03: ("<I", 4),
    0x04: ("<Q", 8),
    0x0A: ("<h", 2),
    0x0B: ("<i", 4),
    0x0C: ("<q", 8),
}
_PE_ULEB, _PE_SLEB = 0x01, 0x09
_PE_PCREL, _PE_DATAREL = 0x10, 0x30


class EhFrameError(ValueError):
    """The section does not parse; the message says where."""


@dataclass(frozen=True)
class Cie:
    code_align: int
    data_align: int
    fde_encoding: int
    augmented: bool  # 'z': FDEs carry an augmentation length
    initial: tuple[int, int]  # [start, end) of the initial instructions in the section


@dataclass(frozen=True)
class Fde:
    """One FDE: [start, end) in virtual addresses, its program's bytes in the section."""

    start: int
    end: int
    cie: Cie
    program: tuple[int, int]


@dataclass(frozen=True)
class CfaRule:
    """CFA = `register` + `offset` at an address (register by name: "rsp", "rbp", ...)."""

    register: str
    offset: int


class _Reader:
    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def need(self, size: int) -> None:
        if self.pos + size > self.end:
            raise EhFrameError(f"entry cut short at section offset {self.pos:#x}")

    def fixed(self, fmt: str, size: int) -> int:
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += size
        return int(value)

    def u8(self) -> int:
        return self.fixed("<B", 1)

    def uleb(self) -> int:
        result = shift = 0
        while True:
            byte = self.u8()
            result |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return result
            if shift > 70:
                raise EhFrameError(f"LEB128 too long at section offset {self.pos:#x}")

    def sleb(self) -> int:
        result = shift = 0
        while True:
            byte = self.u8()
            result |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return result - (1 << shift) if byte & 0x40 else result
            if shift > 70:
                raise EhFrameError(f"LEB128 too long at section offset {self.pos:#x}")

    def cstring(self) -> bytes:
        zero = self.data.find(b"\0", self.pos, self.end)
        if zero < 0:
            raise EhFrameError(f"unterminated string at section offset {self.pos:#x}")
        text = self.data[self.pos : zero]
        self.pos = zero + 1
        return text

    def pointer(self, encoding: int, address: int, *, absolute: bool = False) -> int:
        """A pointer in `encoding`; `address` is the section's virtual address."""
        here = address + self.pos
        kind = encoding & 0x0F
        if kind == _PE_ULEB:
            value = self.uleb()
        elif kind == _PE_SLEB:
            value = self.sleb()
        elif kind in _PE_FORMATS:
            value = self.fixed(*_PE_FORMATS[kind])
        else:
            raise EhFrameError(f"unknown pointer encoding {encoding:#x} at {here:#x}")
        if absolute:
            return value
        application = encoding & 0x70
        if application == _PE_PCREL:
            value += here
        elif application not in (0, _PE_DATAREL):
            raise EhFrameError(f"unsupported pointer application {encoding:#x} at {here:#x}")
        return value & ((1 << 64) - 1)


def parse_fdes(data: bytes, address: int) -> list[Fde]:
    """Every FDE of an .eh_frame section `data` loaded at virtual `address`, in order."""
    cies: dict[int, Cie] = {}
    fdes: list[Fde] = []
    pos = 0
    while pos + 4 <= len(data):
        (length,) = struct.unpack_from("<I", data, pos)
        if length == 0:  # the terminator (or padding)
            break
        header = 4
        if length == 0xFFFFFFFF:
            if pos + 12 > len(data):
                raise EhFrameError(f"entry cut short at section offset {pos:#x}")
            (length,) = struct.unpack_from("<Q", data, pos + 4)
            header = 12
        body = pos + header
        end = body + length
        if end > len(data) or length < 4:
            raise EhFrameError(f"entry at section offset {pos:#x} runs past the section")
        (cie_pointer,) = struct.unpack_from("<I", data, body)
        reader = _Reader(data, body + 4, end)
        if cie_pointer == 0:
            cies[pos] = _parse_cie(reader)
        else:
            cie_at = body - cie_pointer
            cie = cies.get(cie_at)
            if cie is None:
                cie = _parse_cie_at(data, cie_at)
                cies[cie_at] = cie
            start = reader.pointer(cie.fde_encoding, address)
            size = reader.pointer(cie.fde_encoding & 0x0F, address, absolute=True)
            if cie.augmented:
                reader.pos += reader.uleb()
            if reader.pos > end:
                raise EhFrameError(f"FDE at section offset {pos:#x} runs past its end")
            fdes.append(Fde(start, start + size, cie, (reader.pos, end)))
        pos = end
    return fdes


def _parse_cie_at(data: bytes, at: int) -> Cie:
    if not 0 <= at <= len(data) - 8:
        raise EhFrameError(f"an FDE points to a CIE at {at:#x}, outside the section")
    (length,) = struct.unpack_from("<I", data, at)
    if length == 0xFFFFFFFF or at + 4 + length > len(data):
        raise EhFrameError(f"CIE at section offset {at:#x} is malformed")
    return _parse_cie(_Reader(data, at + 8, at + 4 + length))


def _parse_cie(reader: _Reader) -> Cie:
    version = reader.u8()
    augmentation = reader.cstring()
    if augmentation.startswith(b"eh"):
        reader.fixed("<Q", 8)
    code_align = reader.uleb()
    data_align = reader.sleb()
    if version == 1:
        reader.u8()
    else:
        reader.uleb()
    encoding = 0  # absptr
    augmented = augmentation.startswith(b"z")
    if augmented:
        size = reader.uleb()
        stop = reader.pos + size
        for letter in augmentation[1:]:
            if letter == ord("R"):
                encoding = reader.u8()
            elif letter == ord("L"):
                reader.u8()
            elif letter == ord("P"):
                personality = reader.u8()
                reader.pointer(personality & 0x7F, 0)
            elif letter not in b"SB":
                break  # unknown letters: the length lets us skip the rest
        reader.pos = stop
    return Cie(code_align, data_align, encoding, augmented, (reader.pos, reader.end))


def cfa_at(data: bytes, fde: Fde, address: int) -> CfaRule | None:
    """The CFA rule in effect at virtual `address` inside `fde`; None where it is
    not register + offset (a DWARF expression) or cannot be followed."""
    rule: tuple[int, int] | None = None
    stack: list[tuple[int, int] | None] = []
    location = fde.start
    for program in (fde.cie.initial, fde.program):
        reader = _Reader(data, program[0], program[1])
        while reader.pos < reader.end:
            opcode = reader.u8()
            high, low = opcode & 0xC0, opcode & 0x3F
            advance = None
            if high == 0x40:  # DW_CFA_advance_loc
                advance = low
            elif high == 0x80:  # DW_CFA_offset
                reader.uleb()
            elif high == 0xC0:  # DW_CFA_restore
                pass
            elif opcode in (0x02, 0x03, 0x04):  # DW_CFA_advance_loc1/2/4
                advance = reader.fixed(*{0x02: ("<B", 1), 0x03: ("<H", 2), 0x04: ("<I", 4)}[opcode])
            elif opcode == 0x01:  # DW_CFA_set_loc
                location = reader.pointer(fde.cie.fde_encoding, 0, absolute=True)
                if location > address:
                    return _rule(rule)
            elif opcode == 0x0C:  # DW_CFA_def_cfa
                rule = (reader.uleb(), reader.uleb())
            elif opcode == 0x12:  # DW_CFA_def_cfa_sf
                rule = (reader.uleb(), reader.sleb() * fde.cie.data_align)
            elif opcode == 0x0D:  # DW_CFA_def_cfa_register
                register = reader.uleb()
                rule = (register, rule[1]) if rule is not None else None
            elif opcode == 0x0E:  # DW_CFA_def_cfa_offset
                offset = reader.uleb()
                rule = (rule[0], offset) if rule is not None else None
            elif opcode == 0x13:  # DW_CFA_def_cfa_offset_sf
                offset = reader.sleb() * fde.cie.data_align
                rule = (rule[0], offset) if rule is not None else None
            elif opcode == 0x0F:  # DW_CFA_def_cfa_expression
                reader.pos += reader.uleb()
                rule = None
            elif opcode == 0x0A:  # DW_CFA_remember_state
                stack.append(rule)
            elif opcode == 0x0B:  # DW_CFA_restore_state
                if not stack:
                    return None
                rule = stack.pop()
            elif opcode in (0x05, 0x09, 0x14):  # offset_extended, register, val_offset
                reader.uleb()
                reader.uleb()
            elif opcode in (0x11, 0x15, 0x2F):  # *_sf, GNU_negative_offset_extended
                reader.uleb()
                reader.sleb()
            elif opcode in (0x06, 0x07, 0x08, 0x2E):  # restore_ext, undefined, same, args_size
                reader.uleb()
            elif opcode in (0x10, 0x16):  # DW_CFA_expression, val_expression
                reader.uleb()
                reader.pos += reader.uleb()
            elif opcode != 0x00:  # DW_CFA_nop
                return None  # unknown: stop rather than misread
            if advance is not None:
                location += advance * fde.cie.code_align
                if location > address:
                    return _rule(rule)
    return _rule(rule)


def _rule(rule: tuple[int, int] | None) -> CfaRule | None:
    if rule is None or rule[0] not in REGISTER_NAMES:
        return None
    return CfaRule(REGISTER_NAMES[rule[0]], rule[1])
