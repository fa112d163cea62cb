"""Minimal ELF header and program header parsing.

Hand-written rather than pyelftools because it must also work on the first
page of a module read from a process's memory, where no section headers are
mapped and the image may be cut short. Both the file side and the memory side
use this code, so they cannot disagree about what a module is.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from micropatch.errors import ElfError

ELF_MAGIC = b"\x7fELF"
ELFCLASS64 = 2
ELFDATA2LSB = 1
EM_X86_64 = 62
ET_EXEC = 2
ET_DYN = 3

PT_LOAD = 1
PT_NOTE = 4

PF_X = 1
PF_W = 2
PF_R = 4

PN_XNUM = 0xFFFF

EHDR_SIZE = 64
PHDR_SIZE = 56

# e_type, e_machine, e_version, e_entry, e_phoff, e_shoff, e_flags,
# e_ehsize, e_phentsize, e_phnum (the rest is about sections, unused here).
_EHDR = struct.Struct("<HHIQQQIHHH")
_PHDR = struct.Struct("<IIQQQQQQ")

_ET_NAMES = {0: "ET_NONE", 1: "ET_REL (an object file)", 4: "ET_CORE (a core dump)"}


@dataclass(frozen=True)
class ElfHeader:
    """The fields of the ELF header that locate and classify the program headers."""

    type: int
    phoff: int
    phnum: int


@dataclass(frozen=True)
class ProgramHeader:
    """One program header (segment descriptor), addresses as in the file."""

    type: int
    flags: int
    offset: int
    vaddr: int
    filesz: int
    memsz: int
    align: int


def parse_header(data: bytes, what: str) -> ElfHeader:
    """Check that `data` starts with a 64-bit little-endian x86-64 executable or
    shared object header; `what` names the module in error messages."""
    if len(data) < 4 or data[:4] != ELF_MAGIC:
        raise ElfError(f"{what} is not an ELF file (no \\x7fELF magic at offset 0)")
    if len(data) < EHDR_SIZE:
        raise ElfError(
            f"{what} is truncated: {len(data)} bytes, too short for a 64-byte ELF header"
        )
    if data[4] != ELFCLASS64:
        raise ElfError(f"{what} is not a 64-bit ELF object (EI_CLASS={data[4]}); only x86-64")
    if data[5] != ELFDATA2LSB:
        raise ElfError(f"{what} is not little-endian (EI_DATA={data[5]}); only x86-64")
    e_type, e_machine, _, _, e_phoff, _, _, _, e_phentsize, e_phnum = _EHDR.unpack_from(data, 16)
    if e_machine != EM_X86_64:
        raise ElfError(f"{what} is for machine {e_machine}, not x86-64 ({EM_X86_64})")
    if e_type not in (ET_EXEC, ET_DYN):
        kind = _ET_NAMES.get(e_type, f"type {e_type}")
        raise ElfError(f"{what} is {kind}, not an executable or shared object")
    if e_phnum == PN_XNUM:
        raise ElfError(f"{what} uses extended program header numbering, which is unsupported")
    if e_phnum and e_phentsize != PHDR_SIZE:
        raise ElfError(f"{what} has program headers of {e_phentsize} bytes, expected 56")
    return ElfHeader(type=e_type, phoff=e_phoff, phnum=e_phnum)


def parse_program_headers(data: bytes, header: ElfHeader) -> list[ProgramHeader] | None:
    """The program headers, or None if `data` ends before them (a short read of
    a mapped image, which the caller decides how to treat)."""
    end = header.phoff + header.phnum * PHDR_SIZE
    if end > len(data):
        return None
    headers = []
    for i in range(header.phnum):
        p_type, flags, offset, vaddr, _paddr, filesz, memsz, align = _PHDR.unpack_from(
            data, header.phoff + i * PHDR_SIZE
        )
        headers.append(ProgramHeader(p_type, flags, offset, vaddr, filesz, memsz, align))
    return headers
