from __future__ import annotations

import pytest

from micropatch.elf.location import Location, parse_location
from micropatch.errors import PatchFormatError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("parse_packet", Location("parse_packet", 0)),
        ("parse_packet+0x12", Location("parse_packet", 0x12)),
        ("parse_packet+18", Location("parse_packet", 18)),
        (" parse_packet + 0X1a ", Location("parse_packet", 0x1A)),
        ("0x1234", Location(None, 0x1234)),
        ("4660", Location(None, 4660)),
        ("memcpy@@GLIBC_2.14", Location("memcpy@@GLIBC_2.14", 0)),
        ("foo.cold+4", Location("foo.cold", 4)),
        ("_ZN3foo3barEv", Location("_ZN3foo3barEv", 0)),
    ],
)
def test_parse(text: str, expected: Location) -> None:
    assert parse_location(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "+4",
        "foo+",
        "foo-4",
        "foo+0xZZ",
        "0x",
        "foo bar",
        "4foo",
        "foo+4+4",
        "{foo}",
        "foo+010",
        "010",
    ],
)
def test_reject(text: str) -> None:
    with pytest.raises(PatchFormatError, match="is not a location: expected 'symbol'"):
        parse_location(text)


def test_str_round_trips() -> None:
    for location in (Location("f", 0), Location("f", 0x1A), Location(None, 0x40)):
        assert parse_location(str(location)) == location
