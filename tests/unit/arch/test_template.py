"""Precomputed trampolines: `derive` finds the fields, `place` fills them in, and
refuses (None) wherever the assembler could choose another encoding."""

from __future__ import annotations

import struct

from micropatch.arch import TrampolineLayout
from micropatch.arch.x86_64.template import DERIVE_AT, PROVE_AT, derive, size_class

MODULE_TARGET = 0x4321  # a module offset the stand-in body jumps to
SITE = 0x1234  # the site's module offset


def stand_in(address: int, counter: int, base: int) -> TrampolineLayout:
    """What a trampoline looks like to `derive`: `jmp module+0x4321` (rel32), a
    64-bit address of the site, `inc qword [rip + counter]`, then the jump back."""
    code = bytearray(b"\xe9")
    code += struct.pack("<i", base + MODULE_TARGET - (address + 5))
    code += b"\x48\xb8" + struct.pack("<Q", base + SITE)
    code += b"\x48\xff\x05" + struct.pack("<i", counter - (address + len(code) + 7))
    back = len(code)
    code += b"\xe9" + struct.pack("<i", base + SITE + 5 - (address + back + 5))
    return TrampolineLayout(address, bytes(code), (address, address + back), (), False)


def test_derive_finds_each_field_and_place_reproduces_the_code_anywhere() -> None:
    template = derive(stand_in)
    assert template is not None
    kinds = [(f.offset, f.width, f.address, f.counter, f.base, f.kind) for f in template.fields]
    assert kinds == [
        (1, 4, -1, 0, 1, "rel32"),
        (7, 8, 0, 0, 1, "imm64"),
        (18, 4, -1, 1, 0, "rel32"),
        (23, 4, -1, 0, 1, "rel32"),
    ]
    for place in [*PROVE_AT, (0x7F00_0000_1000, 0x7F00_0000_0400, 0x7F00_4000_0000)]:
        assert template.place(*place) == stand_in(*place)


def test_a_value_in_another_size_class_is_left_to_the_assembler() -> None:
    template = derive(stand_in)
    assert template is not None
    address, counter, _ = DERIVE_AT
    near = address + 5 - MODULE_TARGET + 0x10  # the jump to the module: 16 bytes ahead
    assert template.place(address, counter, near) is None
    low = template.place(0x1000_2000, 0x1000_1000, 0x1000_0000)  # addresses in 32 bits
    assert low is None
    far = template.place(address, counter, address + (1 << 31))  # out of rel32 reach
    assert far is None


def test_code_whose_length_depends_on_the_place_gets_no_template() -> None:
    def relaxed(address: int, counter: int, base: int) -> TrampolineLayout:
        layout = stand_in(address, counter, base)
        if address - DERIVE_AT[0] == 0x0111_1111:  # as if a jump became short
            return TrampolineLayout(address, layout.code[:-1], layout.body, (), False)
        return layout

    assert derive(relaxed) is None


def test_code_that_is_not_linear_in_the_places_gets_no_template() -> None:
    def hashed(address: int, counter: int, base: int) -> TrampolineLayout:
        layout = stand_in(address, counter, base)
        return TrampolineLayout(
            address, layout.code + bytes([(address * 7 + base) & 0xFF]), layout.body, (), False
        )

    assert derive(hashed) is None


def test_size_classes() -> None:
    assert size_class(0x7F, 4) == "rel8" and size_class(0xFFFF_FF80, 4) == "rel8"
    assert size_class(0x80, 4) == "rel32" and size_class(0x8000_0000, 4) is None
    assert size_class(0x40_0000, 8) == "imm32" and size_class(1 << 40, 8) == "imm64"


def test_a_value_that_is_near_where_the_template_is_derived_gets_no_template() -> None:
    """Only the far encodings are templated (rel32, a 64-bit address): a field within a
    signed byte at the derivation places could be encoded short by an assembler."""
    address0, counter0, _ = DERIVE_AT

    def near(address: int, counter: int, base: int) -> TrampolineLayout:
        layout = stand_in(address, counter, base)
        value = counter - address - (counter0 - address0) + 5  # 5 at DERIVE_AT
        code = layout.code + struct.pack("<i", value)
        return TrampolineLayout(address, code, layout.body, (), False)

    assert derive(near) is None
