from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from micropatch.elf.image import ElfImage
from micropatch.errors import (
    AmbiguousSymbol,
    ElfError,
    FunctionBoundsUnknown,
    PatchFormatError,
    SymbolNotFound,
)

from .conftest import Built, lowest_load_vaddr, nm_symbols, readelf_build_id, section


def test_image_base_and_kind(built: Built) -> None:
    pie, nopie, lib = (ElfImage.open(p) for p in (built.pie, built.nopie, built.library))
    assert (pie.image_base, pie.is_pie_or_shared) == (0, True)
    assert (nopie.image_base, nopie.is_pie_or_shared) == (0x400000, False)
    assert (lib.image_base, lib.is_pie_or_shared) == (0, True)
    assert nopie.image_base == lowest_load_vaddr(built.nopie) & ~0xFFF
    assert pie.name == "pie"


def test_build_id_matches_readelf(built: Built) -> None:
    for path in (built.pie, built.nopie, built.library, built.pie_stripped):
        assert ElfImage.open(path).build_id == readelf_build_id(path)
    assert ElfImage.open(built.no_build_id).build_id is None


@pytest.mark.parametrize("which", ["pie", "nopie", "library"])
def test_symbol_offsets_match_nm(built: Built, which: str) -> None:
    path = getattr(built, which)
    image = ElfImage.open(path)
    base = lowest_load_vaddr(path) & ~0xFFF
    names = ["parse_packet", "main", "g_limit", "g_counter"] if which != "library" else ["exported"]
    for name in names:
        value, size, _ = nm_symbols(path)[name]
        symbol = image.symbol(name)
        assert (symbol.offset, symbol.size) == (value - base, size), name


def test_versioned_symbols(built: Built) -> None:
    nm = nm_symbols(built.library)
    for path in (built.library, built.library_stripped):  # .symtab, then .dynsym only
        image = ElfImage.open(path)
        assert image.symbol("api").offset == nm["api@@VERS_2"][0]
        assert image.symbol("api@@VERS_2").offset == nm["api@@VERS_2"][0]
        assert image.symbol("api@VERS_2").offset == nm["api@@VERS_2"][0]
        assert image.symbol("api@VERS_1").offset == nm["api@VERS_1"][0]
        assert image.symbol("exported").offset == nm["exported"][0]
    with pytest.raises(SymbolNotFound):
        ElfImage.open(built.library_stripped).symbol("api_v1")  # local: only in .symtab


def test_unknown_symbol_suggests_close_names(built: Built) -> None:
    with pytest.raises(SymbolNotFound) as err:
        ElfImage.open(built.pie).symbol("parse_pakcet")
    message = str(err.value)
    assert "'parse_pakcet'" in message and "pie" in message and "parse_packet" in message


def test_unknown_symbol_in_stripped_module_says_so(built: Built) -> None:
    with pytest.raises(SymbolNotFound, match=r"stripped.*module offset \(0xN\)"):
        ElfImage.open(built.pie_stripped).symbol("parse_packet")


def test_same_named_statics_are_ambiguous(built: Built) -> None:
    out = subprocess.run(["nm", str(built.pie)], capture_output=True, text=True).stdout
    assert sum(line.endswith(" dup") for line in out.splitlines()) == 2
    with pytest.raises(AmbiguousSymbol, match=r"several symbols named 'dup'.*0xN"):
        ElfImage.open(built.pie).symbol("dup")


def test_ifunc_symbol_is_refused(built: Built) -> None:
    with pytest.raises(ElfError, match="indirect function"):
        ElfImage.open(built.pie).symbol("fast")


def test_resolve(built: Built) -> None:
    image = ElfImage.open(built.nopie)
    offset = image.symbol("parse_packet").offset
    assert image.resolve("parse_packet") == offset
    assert image.resolve("parse_packet+0x1a") == offset + 0x1A
    assert image.resolve("parse_packet+26") == offset + 26
    assert image.resolve(" parse_packet + 0x4 ") == offset + 4
    assert image.resolve(hex(offset)) == offset
    with pytest.raises(PatchFormatError, match="not a location"):
        image.resolve("parse_packet-4")
    with pytest.raises(SymbolNotFound):
        image.resolve("nope+4")
    with pytest.raises(ElfError, match="outside every loaded segment"):
        image.resolve("0x7fffffff")


def test_function_at_from_symbols(built: Built) -> None:
    for path in (built.pie, built.nopie):
        image = ElfImage.open(path)
        parse_packet = image.symbol("parse_packet")
        start, end = parse_packet.offset, parse_packet.offset + parse_packet.size
        assert image.function_at(start) == (start, end)
        assert image.function_at(end - 1) == (start, end)


def test_function_at_from_eh_frame_when_stripped(built: Built) -> None:
    for full, stripped in ((built.pie, built.pie_stripped), (built.nopie, built.nopie_stripped)):
        symbol = ElfImage.open(full).symbol("parse_packet")
        image = ElfImage.open(stripped)
        expected = (symbol.offset, symbol.offset + symbol.size)
        assert image.function_at(symbol.offset) == expected
        assert image.function_at(symbol.offset + symbol.size - 1) == expected


def test_function_bounds_unknown(built: Built) -> None:
    offset = nm_symbols(built.nounwind)["parse_packet"][0]
    image = ElfImage.open(built.nounwind_stripped)  # no symbols, no unwind tables for it
    with pytest.raises(FunctionBoundsUnknown, match="check_branches = false") as err:
        image.function_at(offset)
    assert f"{offset:#x}" in str(err.value) and "nounwind.stripped" in str(err.value)
    with pytest.raises(FunctionBoundsUnknown):
        ElfImage.open(built.pie).function_at(0)  # the ELF header is in no function


def test_read_matches_file_bytes(built: Built) -> None:
    for path in (built.pie, built.nopie):
        image = ElfImage.open(path)
        address, file_offset, size = section(path, ".text")
        data = path.read_bytes()
        offset = address - image.image_base
        assert image.read(offset, size) == data[file_offset : file_offset + size]
        assert image.read(offset, 0) == b""


def test_read_outside_file_backed_bytes(built: Built) -> None:
    image = ElfImage.open(built.pie)
    bss_address, _, _ = section(built.pie, ".bss")
    with pytest.raises(ElfError, match="not all file-backed"):
        image.read(bss_address - image.image_base, 4)
    with pytest.raises(ElfError):
        image.read(0x7FFFFFFF, 1)
    with pytest.raises(ElfError):
        image.read(-1, 1)


def test_segments(built: Built) -> None:
    image = ElfImage.open(built.nopie)
    assert image.segments[0].offset == 0
    assert [s.offset for s in image.segments] == sorted(s.offset for s in image.segments)
    text_address, _, _ = section(built.nopie, ".text")
    text = text_address - image.image_base
    assert any(s.executable and s.offset <= text < s.offset + s.memsz for s in image.segments)


def test_from_file_names_the_module(built: Built) -> None:
    with built.library.open("rb") as file:
        file.read(10)  # position does not matter
        image = ElfImage.from_file(file)
    assert image.name == "libver.so"
    assert image.symbol("exported").offset == nm_symbols(built.library)["exported"][0]


def test_not_elf(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello, this is not an ELF file at all\n" * 4)
    with pytest.raises(ElfError, match="not an ELF file"):
        ElfImage.open(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ElfError, match="cannot read"):
        ElfImage.open(tmp_path / "absent.so")


def test_wrong_class_machine_and_type(built: Built, tmp_path: Path) -> None:
    data = bytearray(built.pie.read_bytes())
    for offset, value, message in (
        (4, 1, "not a 64-bit"),
        (5, 2, "not little-endian"),
        (18, 183, "not x86-64"),
    ):
        patched = bytearray(data)
        patched[offset] = value
        path = tmp_path / "patched"
        path.write_bytes(bytes(patched))
        with pytest.raises(ElfError, match=message):
            ElfImage.open(path)
    with pytest.raises(ElfError, match="ET_REL"):
        ElfImage.open(built.object_file)


def test_truncated_files_raise_only_elf_error(built: Built, tmp_path: Path) -> None:
    data = built.pie.read_bytes()
    path = tmp_path / "cut"
    for length in [*range(0, 200, 7), *range(200, len(data), 997)]:
        path.write_bytes(data[:length])
        try:
            image = ElfImage.open(path)
            image.function_at(image.symbol("parse_packet").offset)
        except ElfError as exc:
            assert "cut" in str(exc)


@settings(max_examples=300, deadline=None)
@given(
    flips=st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=20),
    header_bias=st.booleans(),
    cut=st.none() | st.integers(0, 1 << 20),
)
def test_corrupt_files_raise_only_elf_error(
    built: Built, flips: list[tuple[int, int]], header_bias: bool, cut: int | None
) -> None:
    """pyelftools fails in many ways on bad input; all of them must become ElfError."""
    data = bytearray(built.pie_stripped.read_bytes())
    span = 0x400 if header_bias else len(data)
    for position, value in flips:
        data[position % span] = value
    if cut is not None:
        data = data[: cut % len(data)]
    try:
        image = ElfImage(bytes(data), "corrupt")
        for name in ("parse_packet", "printf"):
            with contextlib.suppress(ElfError):
                image.symbol(name)
        for offset in (0, 0x1000, 0x1170):
            with contextlib.suppress(ElfError):
                image.function_at(offset)
    except ElfError:
        pass


def test_truncated_header_message(built: Built, tmp_path: Path) -> None:
    path = tmp_path / "cut"
    path.write_bytes(built.pie.read_bytes()[:40])
    with pytest.raises(ElfError, match="truncated"):
        ElfImage.open(path)
    path.write_bytes(built.pie.read_bytes()[:0x1100])
    with pytest.raises(ElfError, match="truncated"):
        ElfImage.open(path)
