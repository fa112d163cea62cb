"""Module identity: GNU build-id and SHA-256.

A patch names the exact build it was written for. The build-id is read
with the same note parser from a file and from the first page of a mapped
image, so a module on disk and the same module in memory always agree.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from micropatch.elf.header import (
    EHDR_SIZE,
    ELF_MAGIC,
    PF_X,
    PHDR_SIZE,
    PT_LOAD,
    PT_NOTE,
    parse_header,
    parse_program_headers,
)
from micropatch.errors import ElfError

NT_GNU_BUILD_ID = 3
_NOTE_HEADER = struct.Struct("<III")
_CHUNK = 1 << 20
PEEK_SIZE = 4096  # one read holds the headers and the notes of nearly every module
_MAX_NOTES = 1 << 16  # notes read past the first page, at most


@dataclass(frozen=True)
class ModuleIdentity:
    """What a patch pins its target to. Both fields are lowercase hex."""

    build_id: str | None
    sha256: str


def build_id_from_bytes(data: bytes) -> str | None:
    """The GNU build-id of an ELF image given its first bytes (for example the
    first page of the module's mapping read from a process).

    Uses only the ELF and program headers, which are mapped, never section
    headers, which are not. Returns None when the image has no build-id note or
    when the note lies beyond `data`; raises ElfError when `data` does not start
    with an x86-64 ELF header.
    """
    header = parse_header(data, "module image")
    phdrs = parse_program_headers(data, header)
    if phdrs is None:
        return None
    for ph in phdrs:
        if ph.type == PT_NOTE and ph.offset < len(data):
            found = _gnu_build_id(data[ph.offset : ph.offset + ph.filesz], ph.align)
            if found is not None:
                return found
    return None


@dataclass(frozen=True)
class Peeked:
    """What a few small reads say of a file: an x86-64 executable or shared object
    (`module`), its GNU build-id if it has one, and where its executable segment
    ends in the file (`extent`: a file shorter than that is not loadable, e.g. a
    separate debug file, which carries the same build-id but no code)."""

    module: bool
    build_id: str | None = None
    extent: int = 0


NOT_A_MODULE = Peeked(False)


def peek(read: Callable[[int, int], bytes]) -> Peeked:
    """Classify a file from its first page (`read(offset, size)`, e.g. os.pread on
    a descriptor): whether it is an x86-64 module and its build-id, without
    reading or hashing the rest. What an index of every file on a host reads, so
    it never raises on a file that is not ELF; OSError from `read` passes."""
    head = read(0, PEEK_SIZE)
    if head[:4] != ELF_MAGIC:
        return NOT_A_MODULE
    try:
        header = parse_header(head, "file")
        end = header.phoff + header.phnum * PHDR_SIZE
        if end > len(head) and end <= _MAX_NOTES:
            head += read(len(head), end - len(head))
        phdrs = parse_program_headers(head, header)
    except ElfError:
        return NOT_A_MODULE
    if phdrs is None:
        return NOT_A_MODULE  # truncated: not a module anyone can load
    extent = max(
        (ph.offset + ph.filesz for ph in phdrs if ph.type == PT_LOAD and ph.flags & PF_X),
        default=0,
    )
    for ph in phdrs:
        if ph.type != PT_NOTE or not ph.filesz:
            continue
        size = min(ph.filesz, _MAX_NOTES)
        if ph.offset + size <= len(head):
            notes = head[ph.offset : ph.offset + size]
        else:
            notes = read(ph.offset, size)
        found = _gnu_build_id(notes, ph.align)
        if found is not None:
            return Peeked(True, found, extent)
    return Peeked(True, None, extent)


def identify(file: BinaryIO) -> ModuleIdentity:
    """Build-id and SHA-256 of a whole module file, read from its start.

    The file is streamed for the hash, never loaded whole, so identifying a
    large library costs little memory.
    """
    what = _describe(file)
    try:
        file.seek(0)
        header = parse_header(file.read(EHDR_SIZE), what)
        file.seek(0)
        phdrs = parse_program_headers(file.read(header.phoff + header.phnum * PHDR_SIZE), header)
        if phdrs is None:
            raise ElfError(f"{what} is truncated: it ends inside its program headers")
        build_id = None
        for ph in phdrs:
            if ph.type == PT_NOTE:
                file.seek(ph.offset)
                build_id = _gnu_build_id(file.read(ph.filesz), ph.align)
                if build_id is not None:
                    break
        file.seek(0)
        digest = hashlib.sha256()
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    except OSError as exc:
        raise ElfError(f"cannot read {what}: {exc}") from exc
    return ModuleIdentity(build_id=build_id, sha256=digest.hexdigest())


def _gnu_build_id(notes: bytes, align: int) -> str | None:
    # Like glibc, pad names and descriptors to the segment's alignment: 8-byte
    # aligned note segments (.note.gnu.property) are padded to 8, others to 4.
    pad = 8 if align == 8 else 4
    pos = 0
    while pos + _NOTE_HEADER.size <= len(notes):
        namesz, descsz, ntype = _NOTE_HEADER.unpack_from(notes, pos)
        name_at = pos + _NOTE_HEADER.size
        desc_at = name_at + _round_up(namesz, pad)
        if desc_at + descsz > len(notes):
            return None
        if ntype == NT_GNU_BUILD_ID and descsz and notes[name_at : name_at + namesz] == b"GNU\0":
            return notes[desc_at : desc_at + descsz].hex()
        pos = desc_at + _round_up(descsz, pad)
    return None


def _round_up(n: int, to: int) -> int:
    return (n + to - 1) & ~(to - 1)


def _describe(file: BinaryIO) -> str:
    name = getattr(file, "name", None)
    return name if isinstance(name, str) else "module file"
