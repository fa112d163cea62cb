"""The functions of a module: from symbols, and from .eh_frame where it is stripped."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

from micropatch.elf.image import ElfImage
from micropatch.elf.plt import PLT_SECTIONS
from micropatch.elf.sections import SectionMap


@dataclass(frozen=True)
class Function:
    """[start, end) in module offsets; `name` is None for code known only from
    .eh_frame; `source` says where the bounds come from."""

    start: int
    end: int
    name: str | None
    aliases: tuple[str, ...]
    source: str

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def label(self) -> str:
        """The name, or `fn_<offset>` for an unnamed function."""
        return self.name if self.name is not None else f"fn_{self.start:x}"

    def __contains__(self, offset: int) -> bool:
        return self.start <= offset < self.end


def list_functions(image: ElfImage, sections: SectionMap) -> list[Function]:
    """Every function of the module, sorted by start.

    Sized function symbols come first (.symtab, then .dynsym; aliases at one
    address become one function, its largest size winning). Then every
    .eh_frame FDE that starts outside all of them: the unwinder needs an FDE
    for every function gcc emits, and strip keeps .eh_frame. The PLT's FDEs
    are left out: its stubs jump to imports, they are not the module's functions
    (nor callers of the function whose stub they are).
    """
    by_start: dict[int, tuple[int, list[str], str]] = {}
    for symbol in image.function_symbols():
        end, names, _ = by_start.get(symbol.offset, (symbol.offset, [], "symbol"))
        if symbol.name not in names:
            names.append(symbol.name)
        by_start[symbol.offset] = (max(end, symbol.offset + symbol.size), names, "symbol")
    functions = [
        Function(start, end, names[0], tuple(names[1:]), source)
        for start, (end, names, source) in by_start.items()
    ]
    named = sorted((f.start, f.end) for f in functions)
    for start, end in image.fde_ranges():
        section = sections.containing(start)
        if end <= start or start in by_start or section is None or not section.executable:
            continue
        if section.name in PLT_SECTIONS:
            continue
        if _covered(named, start):
            continue
        by_start[start] = (end, [], "eh_frame")
        functions.append(Function(start, end, None, (), "eh_frame"))
    functions.sort(key=lambda f: f.start)
    return functions


def _covered(ranges: list[tuple[int, int]], offset: int) -> bool:
    index = bisect.bisect_right(ranges, (offset, 1 << 64)) - 1
    return index >= 0 and ranges[index][0] <= offset < ranges[index][1]
