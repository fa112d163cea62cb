"""Linking a compiled C patchlet: the code and read-only data sections of its
relocatable object laid out in one blob, its PC-relative relocations applied,
anything else refused with the symbol named (pyelftools reads the object; only
`build` and `dev run` of a source compile C, never an apply)."""

from __future__ import annotations

import io

from elftools.common.exceptions import ELFError
from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from elftools.elf.relocation import RelocationSection
from elftools.elf.sections import Section, Symbol, SymbolTableSection

from micropatch.bodies.cbody import ENTRY, CCompileError, CompiledC

_R_X86_64 = {
    1: "R_X86_64_64",
    2: "R_X86_64_PC32",
    4: "R_X86_64_PLT32",
    9: "R_X86_64_GOTPCREL",
    10: "R_X86_64_32",
    11: "R_X86_64_32S",
    24: "R_X86_64_PC64",
    41: "R_X86_64_GOTPCRELX",
    42: "R_X86_64_REX_GOTPCRELX",
}
_PC32 = frozenset({2, 4})
_PC64 = 24
_GOT = frozenset({9, 41, 42})
_DATA_HELP = (
    "a C patchlet can use its argument, locals, constants and its own functions, but "
    "no global or static variables (the trampoline is read-only), thread-locals, or "
    "library functions"
)


def link(obj: bytes) -> CompiledC:
    """Lay out the code sections of a relocatable object in one blob and apply
    its PC-relative relocations; refuse anything else, naming the symbol."""
    try:
        elf = ELFFile(io.BytesIO(obj))
        return _link(elf)
    except ELFError as exc:
        raise CCompileError(f"the compiler's output is not a usable ELF object: {exc}") from None


def _link(elf: ELFFile) -> CompiledC:
    if elf.get_machine_arch() != "x64" or elf["e_type"] != "ET_REL":
        raise CCompileError("the compiler did not produce an x86-64 relocatable object")
    sections = list(elf.iter_sections())
    symtab = next((s for s in sections if isinstance(s, SymbolTableSection)), None)
    if symtab is None:
        raise CCompileError(f"the object has no symbol table, so no function {ENTRY!r}")
    symbols = list(symtab.iter_symbols())

    placed: dict[int, int] = {}  # section index -> offset in the blob
    blob = bytearray()
    # Code, then read-only data (constants, string literals): the cave is
    # readable, so both can live in the trampoline. Writable data cannot.
    for wanted in (_is_code, _is_constant):
        for index, section in enumerate(sections):
            if wanted(section):
                align = max(1, section["sh_addralign"])
                blob += b"\xcc" * (-len(blob) % align)
                placed[index] = len(blob)
                blob += section.data()
    for index, section in enumerate(sections):
        if index not in placed and _is_data(section):
            raise CCompileError(_data_problem(section, index, symbols))

    for section in sections:
        if not isinstance(section, RelocationSection) or section["sh_info"] not in placed:
            continue
        base = placed[section["sh_info"]]
        for relocation in section.iter_relocations():
            symbol = symbols[relocation["r_info_sym"]]
            kind = relocation["r_info_type"]
            where = base + relocation["r_offset"]
            name = _describe(symbol, sections)
            if symbol["st_shndx"] == "SHN_UNDEF":
                raise CCompileError(
                    f"uses {name}, which the patchlet does not define; {_DATA_HELP}"
                )
            target_section = symbol["st_shndx"]
            if not isinstance(target_section, int) or target_section not in placed:
                section_name = (
                    sections[target_section].name
                    if isinstance(target_section, int)
                    else str(target_section)
                )
                raise CCompileError(f"uses {name} in {section_name}; {_DATA_HELP}")
            if kind in _GOT:
                raise CCompileError(
                    f"reaches {name} through the GOT ({_R_X86_64[kind]}); declare it static"
                )
            value = placed[target_section] + symbol["st_value"] + relocation["r_addend"] - where
            if kind in _PC32:
                if not -(1 << 31) <= value < 1 << 31:
                    raise CCompileError(f"reference to {name} out of 32-bit reach")
                blob[where : where + 4] = value.to_bytes(4, "little", signed=True)
            elif kind == _PC64:
                blob[where : where + 8] = value.to_bytes(8, "little", signed=True)
            else:
                kind_name = _R_X86_64.get(kind, f"relocation type {kind}")
                raise CCompileError(
                    f"uses the absolute address of {name} ({kind_name}); only PC-relative "
                    "references inside the patchlet's code can be moved into a process"
                )

    entries = [
        s
        for s in symbols
        if s.name == ENTRY and s["st_info"]["type"] == "STT_FUNC" and s["st_shndx"] in placed
    ]
    if not entries:
        raise CCompileError(
            f"no function {ENTRY!r}: define `mp_verdict {ENTRY}(struct mp_regs *r)`"
        )
    entry = placed[entries[0]["st_shndx"]] + entries[0]["st_value"]
    return CompiledC(bytes(blob), entry)


def _is_code(section: Section) -> bool:
    flags = section["sh_flags"]
    return bool(
        flags & SH_FLAGS.SHF_ALLOC
        and flags & SH_FLAGS.SHF_EXECINSTR
        and section["sh_type"] == "SHT_PROGBITS"
        and section["sh_size"]
    )


def _is_constant(section: Section) -> bool:
    flags = section["sh_flags"]
    return bool(
        flags & SH_FLAGS.SHF_ALLOC
        and not flags & (SH_FLAGS.SHF_WRITE | SH_FLAGS.SHF_EXECINSTR | SH_FLAGS.SHF_TLS)
        and section["sh_type"] == "SHT_PROGBITS"
        and section["sh_size"]
        and section.name != ".eh_frame"
    )


def _is_data(section: Section) -> bool:
    """Allocated and non-empty: unless placed (code, constants), what a C
    patchlet cannot bring along (writable or thread-local data)."""
    return bool(
        section["sh_flags"] & SH_FLAGS.SHF_ALLOC
        and section["sh_size"]
        and section["sh_type"] not in ("SHT_NOTE", "SHT_X86_64_UNWIND")
        and section.name != ".eh_frame"
    )


def _data_problem(section: Section, index: int, symbols: list[Symbol]) -> str:
    names = [
        s.name
        for s in symbols
        if s["st_shndx"] == index
        and s.name
        and s["st_info"]["type"] in ("STT_OBJECT", "STT_FUNC", "STT_NOTYPE", "STT_TLS")
    ]
    what = f"`{names[0]}` in {section.name}" if names else f"data in {section.name}"
    return f"defines {what}, which is writable; {_DATA_HELP}"


def _describe(symbol: Symbol, sections: list[Section]) -> str:
    if symbol["st_info"]["type"] == "STT_SECTION":
        index = symbol["st_shndx"]
        name = sections[index].name if isinstance(index, int) else "?"
        return f"data in {name}"
    return f"`{symbol.name}`"
