"""An ELF module file seen as the image it becomes when loaded.

Everything is expressed in module offsets (virtual address minus the image
base), the one coordinate system that is the same in the file, in the patch,
and, plus the load bias, in every process that maps the module.
"""

from __future__ import annotations

import difflib
import io
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import BinaryIO

from elftools.common.exceptions import DWARFError, ELFError
from elftools.construct import ConstructError
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.gnuversions import GNUVerDefSection, GNUVerSymSection
from elftools.elf.sections import SymbolTableSection

from micropatch.arch.x86_64.constants import PAGE_SIZE
from micropatch.elf.ehframe import CfaRule, EhFrameError, Fde, cfa_at, parse_fdes
from micropatch.elf.header import (
    ET_DYN,
    PF_X,
    PT_LOAD,
    parse_header,
    parse_program_headers,
)
from micropatch.elf.identity import build_id_from_bytes
from micropatch.elf.location import parse_location
from micropatch.errors import (
    AmbiguousSymbol,
    ElfError,
    FunctionBoundsUnknown,
    SymbolNotFound,
    UnresolvedReference,
)

# What pyelftools raises on malformed or truncated input: besides its own
# errors, it validates with assert and lets lookups, overflows and short
# reads fail as they come (found by fuzzing, see tests/unit/elf).
_PARSE_ERRORS = (
    ELFError,
    DWARFError,
    ConstructError,
    struct.error,
    ValueError,
    ArithmeticError,
    LookupError,
    AssertionError,
)

_SKIPPED_TYPES = frozenset({"STT_SECTION", "STT_FILE", "STT_TLS"})
_FUNCTION_TYPES = frozenset({"STT_FUNC", "STT_LOOS"})  # STT_LOOS is STT_GNU_IFUNC
_VER_FLG_BASE = 1
_VERSYM_HIDDEN = 0x8000


@dataclass(frozen=True)
class Symbol:
    """A defined symbol; `offset` is a module offset, `size` may be 0 (unknown)."""

    name: str
    offset: int
    size: int


@dataclass(frozen=True)
class LoadSegment:
    """A PT_LOAD segment: `offset` is the module offset of its first byte."""

    offset: int
    file_offset: int
    filesz: int
    memsz: int
    flags: int

    @property
    def executable(self) -> bool:
        return bool(self.flags & PF_X)


@dataclass(frozen=True)
class _Entry:
    symbol: Symbol
    is_function: bool
    is_ifunc: bool


@dataclass(frozen=True)
class _SymbolTable:
    section: str
    by_name: dict[str, list[_Entry]]
    functions: list[Symbol]


class ElfImage:
    """Symbols, function bounds and bytes of one x86-64 executable or shared
    object, addressed by module offset.

    The whole file is read into memory once; symbol tables and .eh_frame are
    parsed on first use, since most patches need only a few lookups.
    """

    name: str
    image_base: int
    build_id: str | None
    is_pie_or_shared: bool
    segments: tuple[LoadSegment, ...]

    def __init__(self, data: bytes, name: str) -> None:
        """Prefer `open` or `from_file`; `name` is used in error messages."""
        self.name = name
        header = parse_header(data, name)
        phdrs = parse_program_headers(data, header)
        if phdrs is None:
            raise ElfError(f"{name} is truncated: it ends inside its program headers")
        loads = [ph for ph in phdrs if ph.type == PT_LOAD]
        if not loads:
            raise ElfError(f"{name} has no loadable (PT_LOAD) segments")
        for ph in loads:
            if ph.offset + ph.filesz > len(data):
                raise ElfError(
                    f"{name} is truncated: a segment at vaddr {ph.vaddr:#x} needs file bytes "
                    f"up to {ph.offset + ph.filesz:#x}, but the file has {len(data):#x}"
                )
        self.image_base = min(ph.vaddr for ph in loads) & ~(PAGE_SIZE - 1)
        self.segments = tuple(
            LoadSegment(
                offset=ph.vaddr - self.image_base,
                file_offset=ph.offset,
                filesz=ph.filesz,
                memsz=ph.memsz,
                flags=ph.flags,
            )
            for ph in sorted(loads, key=lambda ph: ph.vaddr)
        )
        self.is_pie_or_shared = header.type == ET_DYN
        self.build_id = build_id_from_bytes(data)
        self._data = data
        try:
            self._elf = ELFFile(io.BytesIO(data))
        except _PARSE_ERRORS as exc:
            raise ElfError(f"{name}: malformed ELF file: {exc}") from exc

    @classmethod
    def open(cls, path: str | Path) -> ElfImage:
        """Read a module file from disk."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ElfError(f"cannot read module file {path}: {exc.strerror}") from exc
        return cls(data, path.name)

    @classmethod
    def from_file(cls, file: BinaryIO, name: str | None = None) -> ElfImage:
        """Read a module from an open binary file (for example one of
        /proc/PID/map_files); `name` defaults to the file's own name."""
        if name is None:
            file_name = getattr(file, "name", None)
            name = Path(file_name).name if isinstance(file_name, str) else "module"
        try:
            file.seek(0)
            data = file.read()
        except OSError as exc:
            raise ElfError(f"cannot read module file {name}: {exc.strerror}") from exc
        return cls(data, name)

    def symbol(self, name: str) -> Symbol:
        """The symbol called `name`, from .symtab if present, else .dynsym.

        A bare name also matches the default version of a versioned symbol
        (`memcpy` finds `memcpy@@GLIBC_2.14`), as the dynamic linker would.
        """
        for table in self._tables:
            entries = table.by_name.get(name)
            if not entries:
                continue
            if len({entry.symbol.offset for entry in entries}) > 1:
                where = ", ".join(
                    f"{entry.symbol.name} at {entry.symbol.offset:#x}" for entry in entries
                )
                raise AmbiguousSymbol(
                    f"{self.name}: {table.section} has several symbols named {name!r} "
                    f"({where}); name the site by module offset (0xN) instead"
                )
            if any(entry.is_ifunc for entry in entries):
                raise ElfError(
                    f"{self.name}: {name!r} is an indirect function (STT_GNU_IFUNC): its "
                    "address is the resolver that picks an implementation at load time, "
                    "not the code that runs; name the implementation or a module offset"
                )
            return max((entry.symbol for entry in entries), key=lambda symbol: symbol.size)
        raise SymbolNotFound(self._not_found_message(name))

    def resolve(self, location: str) -> int:
        """The module offset of a location: `symbol`, `symbol+0xN`, `symbol+N`
        or `0xN`; it must fall inside a loaded segment."""
        parsed = parse_location(location)
        if parsed.module is not None:
            raise UnresolvedReference(
                f"{location!r} is in another module ({parsed.module}): it is resolved in each "
                "process, not in this module's file"
            )
        offset = parsed.addend
        if parsed.symbol is not None:
            offset += self.symbol(parsed.symbol).offset
        if not any(seg.offset <= offset < seg.offset + seg.memsz for seg in self.segments):
            raise ElfError(
                f"{self.name}: location {location!r} is module offset {offset:#x}, "
                "outside every loaded segment"
            )
        return offset

    def function_at(self, offset: int) -> tuple[int, int]:
        """[start, end) module offsets of the function containing `offset`.

        Sized function symbols win; stripped modules fall back on .eh_frame,
        which the unwinder needs and strip therefore keeps.
        """
        for table in self._tables:
            covering = [f for f in table.functions if f.offset <= offset < f.offset + f.size]
            if covering:
                best = min(covering, key=lambda f: (f.size, f.offset))
                return best.offset, best.offset + best.size
        for start, end in self._fde_ranges:
            if start <= offset < end:
                return start, end
        raise FunctionBoundsUnknown(
            f"{self.name}: no function is known to contain module offset {offset:#x} "
            "(no sized function symbol in .symtab or .dynsym and no .eh_frame entry covers "
            "it), so branches into the site cannot be checked; set check_branches = false "
            "on this patchlet to skip the check, at your own risk"
        )

    def read(self, offset: int, size: int) -> bytes:
        """The file's bytes at a module offset; they must lie within one
        segment's file-backed part (not .bss)."""
        if offset >= 0 and size >= 0:
            for seg in self.segments:
                if seg.offset <= offset and offset + size <= seg.offset + seg.filesz:
                    start = seg.file_offset + offset - seg.offset
                    return self._data[start : start + size]
        raise ElfError(
            f"{self.name}: {size} bytes at module offset {offset:#x} are not all "
            "file-backed bytes of one loaded segment"
        )

    def read_upto(self, offset: int, size: int) -> bytes:
        """Up to `size` file bytes at a module offset, cut at the end of the
        segment's file-backed part; empty if the offset is not file-backed."""
        for seg in self.segments:
            if seg.offset <= offset < seg.offset + seg.filesz:
                start = seg.file_offset + offset - seg.offset
                stop = seg.file_offset + min(offset + size, seg.offset + seg.filesz) - seg.offset
                return self._data[start:stop]
        return b""

    def function_symbols(self) -> list[Symbol]:
        """Every sized function symbol, those of .symtab first, then .dynsym's
        (a symbol in both appears twice)."""
        return [symbol for table in self._tables for symbol in table.functions]

    def fde_ranges(self) -> list[tuple[int, int]]:
        """[start, end) module offsets of every .eh_frame FDE, in file order."""
        return list(self._fde_ranges)

    @cached_property
    def soname(self) -> str | None:
        """The DT_SONAME of a shared library (`libfoo.so.1`), the name the loader
        looks it up by; None if it has none."""
        try:
            for section in self._elf.iter_sections():
                if isinstance(section, DynamicSection):
                    for tag in section.iter_tags("DT_SONAME"):
                        return str(tag.soname)  # type: ignore[attr-defined]
        except _PARSE_ERRORS as exc:
            raise ElfError(f"{self.name}: malformed dynamic section: {exc}") from exc
        return None

    @property
    def elffile(self) -> ELFFile:
        """The pyelftools view of the file, for the other elf/ readers."""
        return self._elf

    @cached_property
    def _tables(self) -> tuple[_SymbolTable, ...]:
        tables = []
        try:
            for section_name in (".symtab", ".dynsym"):
                section = self._elf.get_section_by_name(section_name)
                if isinstance(section, SymbolTableSection):
                    tables.append(self._read_table(section_name, section))
        except _PARSE_ERRORS as exc:
            raise ElfError(f"{self.name}: malformed symbol table: {exc}") from exc
        return tuple(tables)

    def _read_table(self, section_name: str, section: SymbolTableSection) -> _SymbolTable:
        versions = self._dynamic_versions() if section_name == ".dynsym" else {}
        by_name: dict[str, list[_Entry]] = {}
        functions = []
        for index, sym in enumerate(section.iter_symbols()):
            kind = sym["st_info"]["type"]
            undefined = sym["st_shndx"] in ("SHN_UNDEF", "SHN_ABS")
            if not sym.name or kind in _SKIPPED_TYPES or undefined:
                continue
            name = sym.name + versions.get(index, "")
            offset = sym["st_value"] - self.image_base
            symbol = Symbol(name=name, offset=offset, size=sym["st_size"])
            entry = _Entry(symbol, kind in _FUNCTION_TYPES, kind == "STT_LOOS")
            for key in _lookup_keys(name):
                by_name.setdefault(key, []).append(entry)
            if entry.is_function and symbol.size > 0:
                functions.append(symbol)
        return _SymbolTable(section_name, by_name, functions)

    def _dynamic_versions(self) -> dict[int, str]:
        """Version suffixes ("@@GLIBC_2.14", "@GLIBC_2.2.5") of .dynsym entries,
        which pyelftools reports without their versions."""
        versym = verdef = None
        for section in self._elf.iter_sections():
            if isinstance(section, GNUVerSymSection):
                versym = section
            elif isinstance(section, GNUVerDefSection):
                verdef = section
        if versym is None or verdef is None:
            return {}
        names = {}
        for version, aux in verdef.iter_versions():
            if not version["vd_flags"] & _VER_FLG_BASE:
                names[version["vd_ndx"]] = next(iter(aux)).name
        suffixes = {}
        for index, (raw,) in enumerate(struct.iter_unpack("<H", versym.data())):
            name = names.get(raw & ~_VERSYM_HIDDEN)
            if name is not None:
                suffixes[index] = ("@" if raw & _VERSYM_HIDDEN else "@@") + name
        return suffixes

    def cfa_at(self, offset: int) -> CfaRule | None:
        """The CFA rule (register + offset) at module offset `offset` from the .eh_frame
        FDE covering it; None if none covers it or the rule is not register + offset."""
        data, fdes = self._eh_frame
        address = offset + self.image_base
        for fde in fdes:
            if fde.start <= address < fde.end:
                try:
                    return cfa_at(data, fde, address)
                except EhFrameError as exc:
                    raise ElfError(f"{self.name}: malformed .eh_frame: {exc}") from exc
        return None

    @cached_property
    def _fde_ranges(self) -> list[tuple[int, int]]:
        _, fdes = self._eh_frame
        return [(f.start - self.image_base, f.end - self.image_base) for f in fdes]

    @cached_property
    def _eh_frame(self) -> tuple[bytes, list[Fde]]:
        try:
            section = self._elf.get_section_by_name(".eh_frame")
            if section is None or section["sh_type"] == "SHT_NOBITS":
                return b"", []
            data = section.data()
            return data, parse_fdes(data, section["sh_addr"])
        except (*_PARSE_ERRORS, EhFrameError) as exc:
            raise ElfError(f"{self.name}: malformed .eh_frame: {exc}") from exc

    def _not_found_message(self, name: str) -> str:
        searched = [table.section for table in self._tables]
        known = sorted({key for table in self._tables for key in table.by_name})
        message = f"no symbol {name!r} in {self.name}"
        if not searched:
            return f"{message}: it has no symbol table; name the site by module offset (0xN)"
        message += f" (searched {', '.join(searched)})"
        close = difflib.get_close_matches(name, known, n=3)
        if close:
            message += f"; close names: {', '.join(close)}"
        if ".symtab" not in searched:
            message += (
                "; the module is stripped, so only exported symbols are known: name other "
                "sites by module offset (0xN)"
            )
        return message


def _lookup_keys(name: str) -> Iterator[str]:
    """`f@@V` (the default version) is also found as `f@V` and `f`; `f@V`
    (a non-default version) only by its full name."""
    yield name
    base, sep, version = name.partition("@@")
    if sep:
        yield f"{base}@{version}"
        yield base
