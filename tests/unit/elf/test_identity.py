from __future__ import annotations

import hashlib
import io
import struct
from pathlib import Path

import pytest

from micropatch.elf.identity import ModuleIdentity, build_id_from_bytes, identify
from micropatch.errors import ElfError

from .conftest import Built, readelf_build_id


def test_identify_matches_readelf_and_sha256(built: Built) -> None:
    for path in (built.pie, built.nopie, built.library, built.pie_stripped):
        with path.open("rb") as file:
            identity = identify(file)
        assert identity == ModuleIdentity(
            build_id=readelf_build_id(path),
            sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        )


def test_stripping_keeps_build_id_but_changes_sha256(built: Built) -> None:
    with built.pie.open("rb") as full, built.pie_stripped.open("rb") as stripped:
        a, b = identify(full), identify(stripped)
    assert a.build_id == b.build_id and a.sha256 != b.sha256


def test_no_build_id(built: Built) -> None:
    with built.no_build_id.open("rb") as file:
        assert identify(file).build_id is None
    assert build_id_from_bytes(built.no_build_id.read_bytes()[:4096]) is None


def test_build_id_from_first_page(built: Built) -> None:
    for path in (built.pie, built.nopie, built.library, built.pie_stripped):
        assert build_id_from_bytes(path.read_bytes()[:4096]) == readelf_build_id(path)


def test_build_id_beyond_the_data_is_none(built: Built) -> None:
    data = built.pie.read_bytes()
    assert build_id_from_bytes(data[:64]) is None  # header only: no program headers
    assert build_id_from_bytes(data[:0x300]) is None  # program headers, not the note


def test_build_id_from_bytes_needs_no_section_headers(built: Built) -> None:
    data = bytearray(built.pie.read_bytes()[:4096])
    struct.pack_into("<QHHH", data, 0x28, 0, 0, 0, 0)  # e_shoff = e_shentsize = e_shnum = 0
    assert build_id_from_bytes(bytes(data)) == readelf_build_id(built.pie)


def test_eight_byte_aligned_notes() -> None:
    """A note segment aligned to 8 pads names and descriptors to 8 (glibc rules)."""
    build_id = bytes(range(20))
    property_note = struct.pack("<III", 4, 4, 5) + b"GNU\0" + b"\0" * 4 + b"\1\2\3\4" + b"\0" * 4
    id_note = struct.pack("<III", 4, 20, 3) + b"GNU\0" + b"\0" * 4 + build_id + b"\0" * 4
    notes = property_note + id_note
    ehdr = bytearray(64)
    ehdr[:6] = b"\x7fELF\x02\x01"
    struct.pack_into("<HHIQQQIHHH", ehdr, 16, 3, 62, 1, 0, 64, 0, 0, 64, 56, 1)
    phdr = struct.pack("<IIQQQQQQ", 4, 4, 120, 120, 120, len(notes), len(notes), 8)
    assert build_id_from_bytes(bytes(ehdr) + phdr + notes) == build_id.hex()


def test_not_elf_bytes() -> None:
    with pytest.raises(ElfError, match="not an ELF file"):
        build_id_from_bytes(b"#!/bin/sh\necho hi\n")
    with pytest.raises(ElfError, match="truncated"):
        build_id_from_bytes(b"\x7fELF\x02\x01")


def test_identify_errors(built: Built, tmp_path: Path) -> None:
    with pytest.raises(ElfError, match="not an ELF file"):
        identify(io.BytesIO(b"plain text"))
    data = built.pie.read_bytes()
    cut = tmp_path / "cut"
    cut.write_bytes(data[:100])
    with cut.open("rb") as file, pytest.raises(ElfError, match="cut is truncated"):
        identify(file)
