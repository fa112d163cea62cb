"""A place for the remote-syscall stub: bytes of executable memory that no code
of the process ever reaches.

An ELF's executable segment rarely ends on a page boundary; the rest of its
last page is mapped executable but is padding, never a branch target: the
linker put nothing there. Thirty-odd bytes of it hold the stub that makes a
borrowed thread's system call crash-safe (see `process.syscall`). Found by
reading each mapped ELF's program headers from the process's own memory, so
it works for any module, the vDSO included, without opening a file.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

from micropatch.arch.x86_64.constants import PAGE_SIZE
from micropatch.elf.header import PF_X, PT_LOAD, parse_header, parse_program_headers
from micropatch.errors import MicropatchError
from micropatch.process.maps import Mapping
from micropatch.process.memory import Memory

_HEADERS = PAGE_SIZE  # program headers live in the first page of every sane ELF


def slack(memory: Memory, mappings: Iterable[Mapping], size: int) -> int | None:
    """The address of `size` bytes of executable padding, or None if none is found.

    The target's own modules come first in `mappings` order; the vDSO last,
    since a write there makes a private copy of a page every process shares.
    """
    mappings = list(mappings)
    candidates = sorted(
        (m for m in mappings if m.executable and m.readable and (m.inode or m.path == "[vdso]")),
        key=lambda m: m.path == "[vdso]",
    )
    for m in candidates:
        with contextlib.suppress(MicropatchError):
            found = _slack_in(memory, mappings, m, size)
            if found is not None:
                return found
    return None


def _slack_in(memory: Memory, mappings: list[Mapping], m: Mapping, size: int) -> int | None:
    first = m if m.offset == 0 else _first_mapping(mappings, m)
    if first is None:
        return None
    data = memory.read(first.start, min(_HEADERS, first.size))
    header = parse_header(data, m.path or "module")
    segments = parse_program_headers(data, header)
    if not segments:
        return None
    page = PAGE_SIZE - 1
    for s in segments:
        if s.type != PT_LOAD or not s.flags & PF_X:
            continue
        if s.offset & ~page != m.offset:
            continue  # another segment than the one this mapping holds
        end = m.start + (s.vaddr & page) + s.memsz
        if m.start < end and end + size <= m.end:
            return (end + 15) & ~15 if ((end + 15) & ~15) + size <= m.end else end
    return None


def _first_mapping(mappings: list[Mapping], m: Mapping) -> Mapping | None:
    """The mapping of the same file at offset 0, where its ELF header is."""
    return next(
        (x for x in mappings if x.inode == m.inode and x.dev == m.dev and x.offset == 0), None
    )
