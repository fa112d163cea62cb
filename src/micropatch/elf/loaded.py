"""A module as it is mapped in a process, read through a callable: its load bias,
its exported symbols (through the GNU hash table of its dynamic section) and
where its unwind table is.

Nothing here opens the module's file: everything is read from the image the
loader mapped, so it works for a file since deleted or upgraded on disk, for
one in another mount namespace, and without pyelftools parsing megabytes of
symbols to find a handful of names.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from micropatch.arch.x86_64.constants import PAGE_SIZE
from micropatch.elf.header import PT_LOAD, ProgramHeader, parse_header, parse_program_headers
from micropatch.errors import ElfError

Reader = Callable[[int, int], bytes]

PT_DYNAMIC = 2
PT_GNU_EH_FRAME = 0x6474E550
DT_NULL = 0
DT_HASH = 4
DT_STRTAB = 5
DT_SYMTAB = 6
DT_GNU_HASH = 0x6FFFFEF5
_SYM = struct.Struct("<IBBHQQ")  # st_name, st_info, st_other, st_shndx, st_value, st_size
_SHN_UNDEF = 0
_MAX_NAME = 512
_MAX_CHAIN = 1 << 16  # a hash chain longer than this is corrupt, not a real table


def gnu_hash(name: bytes) -> int:
    h = 5381
    for byte in name:
        h = (h * 33 + byte) & 0xFFFFFFFF
    return h


@dataclass(frozen=True)
class LoadedImage:
    """The module whose ELF header is mapped at `start` (its mapping at file offset 0)."""

    read: Reader
    start: int
    name: str

    @cached_property
    def _headers(self) -> list[ProgramHeader]:
        data = self.read(self.start, PAGE_SIZE)
        headers = parse_program_headers(data, parse_header(data, self.name))
        if headers is None:
            raise ElfError(f"{self.name}: program headers not in the first mapped page")
        return headers

    @cached_property
    def bias(self) -> int:
        """What to add to a virtual address of the file to get one in the process."""
        first = min(h.vaddr for h in self._headers if h.type == PT_LOAD)
        return self.start - (first & ~(PAGE_SIZE - 1))

    def segment(self, kind: int) -> ProgramHeader | None:
        return next((h for h in self._headers if h.type == kind), None)

    @cached_property
    def _dynamic(self) -> dict[int, int]:
        header = self.segment(PT_DYNAMIC)
        if header is None:
            raise ElfError(f"{self.name} has no dynamic section: it exports no symbols")
        data = self.read(self.bias + header.vaddr, header.memsz)
        entries: dict[int, int] = {}
        for tag, value in struct.iter_unpack("<qQ", data[: len(data) // 16 * 16]):
            if tag == DT_NULL:
                break
            entries.setdefault(tag, value)
        return entries

    def _pointer(self, tag: int) -> int | None:
        """A dynamic entry's address in the process: the loader relocates them in
        place in shared objects, not in the vDSO or in an executable at its own address."""
        value = self._dynamic.get(tag)
        if value is None:
            return None
        return value if value >= self.start else value + self.bias

    def symbol(self, name: str) -> int | None:
        """The address of an exported (defined) symbol, or None."""
        wanted = name.encode()
        symtab, strtab = self._pointer(DT_SYMTAB), self._pointer(DT_STRTAB)
        if symtab is None or strtab is None:
            return None
        for index in self._candidates(wanted):
            st_name: int
            value: int
            st_name, _info, _other, shndx, value, _size = _SYM.unpack(
                self.read(symtab + index * _SYM.size, _SYM.size)
            )
            if shndx == _SHN_UNDEF or not value:
                continue
            if self._name_at(strtab + st_name) == wanted:
                return value + self.bias
        return None

    def _name_at(self, address: int) -> bytes:
        data = self.read(address, _MAX_NAME)
        end = data.find(b"\0")
        return data if end < 0 else data[:end]

    def _candidates(self, name: bytes) -> list[int]:
        """Symbol indexes whose hash matches `name`, from DT_GNU_HASH (else DT_HASH)."""
        table = self._pointer(DT_GNU_HASH)
        if table is not None:
            return self._gnu_candidates(table, name)
        table = self._pointer(DT_HASH)
        if table is None:
            raise ElfError(f"{self.name} has neither DT_GNU_HASH nor DT_HASH")
        nbucket, nchain = struct.unpack("<II", self.read(table, 8))
        h = 0
        for byte in name:
            h = ((h << 4) + byte) & 0xFFFFFFFF
            h ^= (h >> 24) & 0xF0
            h &= 0x0FFFFFFF
        index: int = struct.unpack("<I", self.read(table + 8 + 4 * (h % nbucket), 4))[0]
        found: list[int] = []
        while index and len(found) < min(nchain, _MAX_CHAIN):
            found.append(index)
            index = struct.unpack("<I", self.read(table + 8 + 4 * (nbucket + index), 4))[0]
        return found

    def _gnu_candidates(self, table: int, name: bytes) -> list[int]:
        nbuckets, symoffset, bloom_size, _shift = struct.unpack("<IIII", self.read(table, 16))
        if not nbuckets:
            return []
        h = gnu_hash(name)
        buckets = table + 16 + 8 * bloom_size
        index: int = struct.unpack("<I", self.read(buckets + 4 * (h % nbuckets), 4))[0]
        if index < symoffset:
            return []
        chains = buckets + 4 * nbuckets
        found = []
        for _ in range(_MAX_CHAIN):
            value: int = struct.unpack("<I", self.read(chains + 4 * (index - symoffset), 4))[0]
            if (value | 1) == (h | 1):
                found.append(index)
            if value & 1:
                return found
            index += 1
        raise ElfError(f"{self.name}: corrupt GNU hash table (endless chain)")
