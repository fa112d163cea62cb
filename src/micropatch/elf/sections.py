"""The sections of a module, in module offsets, for tools that classify addresses
(is this reference into code, into read-only data, into the GOT?)."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from micropatch.elf.image import _PARSE_ERRORS, ElfImage
from micropatch.errors import ElfError

_SHF_WRITE = 0x1
_SHF_ALLOC = 0x2
_SHF_EXECINSTR = 0x4


@dataclass(frozen=True)
class Section:
    """An allocated section: `offset` is the module offset of its first byte."""

    name: str
    offset: int
    size: int
    entsize: int
    writable: bool
    executable: bool
    file_backed: bool

    @property
    def end(self) -> int:
        return self.offset + self.size


class SectionMap:
    """The allocated sections of a module, sorted, with a lookup by offset."""

    def __init__(self, image: ElfImage) -> None:
        found = []
        try:
            for section in image.elffile.iter_sections():
                flags = section["sh_flags"]
                if not flags & _SHF_ALLOC or section["sh_size"] == 0:
                    continue
                found.append(
                    Section(
                        name=section.name,
                        offset=section["sh_addr"] - image.image_base,
                        size=section["sh_size"],
                        entsize=section["sh_entsize"],
                        writable=bool(flags & _SHF_WRITE),
                        executable=bool(flags & _SHF_EXECINSTR),
                        file_backed=section["sh_type"] != "SHT_NOBITS",
                    )
                )
        except _PARSE_ERRORS as exc:
            raise ElfError(f"{image.name}: malformed section headers: {exc}") from exc
        self.sections = tuple(sorted(found, key=lambda s: s.offset))
        self._starts = [s.offset for s in self.sections]

    def named(self, name: str) -> Section | None:
        """The section called `name`, if the module has it."""
        return next((s for s in self.sections if s.name == name), None)

    def containing(self, offset: int) -> Section | None:
        """The section holding module offset `offset`, if any."""
        index = bisect.bisect_right(self._starts, offset) - 1
        if index >= 0 and offset < self.sections[index].end:
            return self.sections[index]
        return None

    def executable(self) -> list[Section]:
        """The sections holding code, in address order."""
        return [s for s in self.sections if s.executable]
