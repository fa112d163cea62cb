"""The .eh_frame reader against pyelftools' full decoder, on the test programs and
on the machine's own libc and Python; malformed sections fail with a clear error."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
from elftools.dwarf.callframe import FDE
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings
from hypothesis import strategies as st

from micropatch.elf.ehframe import DWARF_RBP, DWARF_RSP, EhFrameError, cfa_at, parse_fdes
from micropatch.elf.image import ElfImage
from micropatch.errors import ElfError

from .conftest import Built

_NAMES = {DWARF_RSP: "rsp", DWARF_RBP: "rbp"}


def _modules(built: Built) -> list[Path]:
    found = [built.pie, built.nopie, built.pie_stripped, Path(sys.executable).resolve()]
    libc = Path("/lib/x86_64-linux-gnu/libc.so.6")
    return [*found, libc] if libc.exists() else found


def _reference(path: Path) -> tuple[ELFFile, list[FDE]]:
    elf = ELFFile(open(path, "rb"))  # noqa: SIM115 (closed with the test process)
    entries = elf.get_dwarf_info(follow_links=False).EH_CFI_entries()
    return elf, [e for e in entries if isinstance(e, FDE)]


def test_fde_ranges_match_pyelftools(built: Built) -> None:
    for path in _modules(built):
        image = ElfImage.open(path)
        _, fdes = _reference(path)
        expected = [
            (
                f.header["initial_location"] - image.image_base,
                f.header["initial_location"] - image.image_base + f.header["address_range"],
            )
            for f in fdes
        ]
        assert image.fde_ranges() == expected, path


def test_cfa_rule_matches_pyelftools_at_every_row(built: Built) -> None:
    rng = random.Random(7)
    for path in _modules(built):
        image = ElfImage.open(path)
        _, fdes = _reference(path)
        checked = 0
        for fde in rng.sample(fdes, min(150, len(fdes))):
            rows = fde.get_decoded().table
            end = fde.header["initial_location"] + fde.header["address_range"]
            for i, row in enumerate(rows):
                stop = rows[i + 1]["pc"] if i + 1 < len(rows) else end
                cfa = row["cfa"]
                want = None
                if cfa.expr is None and cfa.reg in _NAMES:
                    want = (_NAMES[cfa.reg], cfa.offset)
                for address in {row["pc"], stop - 1}:
                    got = image.cfa_at(address - image.image_base)
                    assert (got and (got.register, got.offset)) == want, (path, hex(address))
                    checked += 1
        assert checked >= min(30, 2 * len(fdes)), path


def test_cfa_at_a_known_function(built: Built) -> None:
    image = ElfImage.open(built.pie)
    start = image.symbol("parse_packet").offset
    rule = image.cfa_at(start)
    assert rule is not None and (rule.register, rule.offset) == ("rsp", 8)  # return address only
    assert image.cfa_at(0) is None  # the ELF header: no FDE covers it


def test_truncated_section_is_an_error() -> None:
    with pytest.raises(EhFrameError, match="runs past the section"):
        parse_fdes(b"\x40\x00\x00\x00\x00\x00\x00\x00", 0x1000)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 1 << 40))
def test_arbitrary_bytes_never_escape_as_another_error(data: bytes, address: int) -> None:
    try:
        fdes = parse_fdes(data, address)
    except EhFrameError as exc:
        assert str(exc)
        return
    for fde in fdes:
        try:
            cfa_at(data, fde, fde.start)
        except EhFrameError as exc:
            assert str(exc)


def test_malformed_eh_frame_names_the_module(built: Built, tmp_path: Path) -> None:
    data = bytearray(built.pie.read_bytes())
    elf = ELFFile(open(built.pie, "rb"))  # noqa: SIM115
    section = elf.get_section_by_name(".eh_frame")
    offset = section["sh_offset"]
    data[offset : offset + 4] = (0x7FFFFFF0).to_bytes(4, "little")  # a length past the end
    broken = tmp_path / "broken"
    broken.write_bytes(bytes(data))
    with pytest.raises(ElfError, match=r"broken: malformed \.eh_frame"):
        ElfImage.open(broken).fde_ranges()
