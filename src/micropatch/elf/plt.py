"""Names of the functions and data a module imports, by where its code reaches them.

Code reaches an imported function through a PLT stub (`call foo@plt`, in
.plt, .plt.sec or .plt.got) or directly through its GOT slot
(`call [rip+x]`, built with -fno-plt); it reaches imported data through a GOT
slot (`mov rax, [rip+x]` of `PyExc_ValueError`). The dynamic relocations
(R_X86_64_JUMP_SLOT, R_X86_64_GLOB_DAT) name the symbol each slot receives; a
stub is named after the slot its `jmp [rip+x]` goes through.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import SymbolTableSection

from micropatch.elf.image import _PARSE_ERRORS, ElfImage
from micropatch.elf.sections import SectionMap
from micropatch.errors import ElfError

_R_X86_64_COPY = 5
_R_X86_64_GLOB_DAT = 6
_R_X86_64_JUMP_SLOT = 7
# An executable's copy of imported data (stderr) is named by its R_X86_64_COPY.
_NAMED_SLOTS = (_R_X86_64_JUMP_SLOT, _R_X86_64_GLOB_DAT, _R_X86_64_COPY)
# The sections of PLT stubs: code that jumps to an import, not a function of the module.
PLT_SECTIONS = (".plt", ".plt.sec", ".plt.got")
_JMP_RIP = b"\xff\x25"  # jmp qword ptr [rip+rel32], possibly after a bnd (f2) prefix
_DEFAULT_ENTRY = 16


@dataclass(frozen=True)
class Imports:
    """`slots`: GOT slot offset -> imported name; `stubs`: PLT stub offset -> name."""

    slots: dict[int, str]
    stubs: dict[int, str]

    def name_of(self, offset: int) -> str | None:
        """The imported name a call to `offset` (a stub) or through it (a slot) reaches."""
        return self.stubs.get(offset) or self.slots.get(offset)


def read_imports(image: ElfImage, sections: SectionMap) -> Imports:
    """Read the import slots from the relocations and name the PLT stubs after them."""
    slots = _slots(image)
    stubs: dict[int, str] = {}
    for name in PLT_SECTIONS:
        section = sections.named(name)
        if section is None or not section.file_backed:
            continue
        code = image.read_upto(section.offset, section.size)
        entry = section.entsize or _DEFAULT_ENTRY
        for start in range(0, len(code) - entry + 1, entry):
            slot = _stub_slot(code, start, entry, section.offset)
            if slot is not None and slot in slots:
                stubs[section.offset + start] = slots[slot]
    return Imports(slots=slots, stubs=stubs)


def _slots(image: ElfImage) -> dict[int, str]:
    slots: dict[int, str] = {}
    try:
        elf = image.elffile
        for section in elf.iter_sections():
            if not isinstance(section, RelocationSection) or not section.is_RELA():
                continue
            link = section["sh_link"]
            if link == 0:
                continue
            symbols = elf.get_section(link)
            if not isinstance(symbols, SymbolTableSection):
                continue
            for reloc in section.iter_relocations():
                if reloc["r_info_type"] not in _NAMED_SLOTS:
                    continue
                symbol = symbols.get_symbol(reloc["r_info_sym"])
                if symbol.name:
                    slots[reloc["r_offset"] - image.image_base] = symbol.name
    except _PARSE_ERRORS as exc:
        raise ElfError(f"{image.name}: malformed dynamic relocations: {exc}") from exc
    return slots


def _stub_slot(code: bytes, start: int, entry: int, base: int) -> int | None:
    """The GOT slot the first `jmp [rip+x]` of one stub goes through."""
    at = code.find(_JMP_RIP, start, start + entry)
    if at < 0 or at + 6 > len(code):
        return None
    displacement: int = struct.unpack_from("<i", code, at + 2)[0]
    return base + at + 6 + displacement
