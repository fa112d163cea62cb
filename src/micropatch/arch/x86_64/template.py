"""Trampolines precomputed at build time: code, and the fields that depend on where it lands.

A signed artifact is built for one exact module build, so everything in a
trampoline is known at build time except three numbers: where the trampoline
lands (`address`), where its blocked-event counter is (`counter`), and where
the module is loaded (`base`). Each byte that depends on them belongs to a
little-endian field whose value is linear in them:

    value = a * address + c * counter + b * base + addend   (mod 2**(8 * width))

with a, b, c in {-1, 0, 1}: a jump or RIP-relative operand into the module is
`base + k - address`, one to the counter `counter + k - address`, a 64-bit
address `base + k`. `derive` finds the fields by laying the trampoline out
with the assembler and the decoder at places that differ in one number at a
time, then proves the template reproduces the assembler's bytes exactly at
other places; `TrampolineTemplate.place` fills the fields in, with no
assembler and no decoder.

The assembler's and the encoder's choices depend on the values only through
their size class (a branch that fits a signed byte is encoded short; a 64-bit
immediate that fits 32 bits may be encoded in 4): each field records the class
it had at build, and `place` returns None for a place where any value falls in
another class, or out of reach. The caller then lays that trampoline out with
the assembler, as without a template, and gets the same bytes or the same error.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from micropatch.arch.base import TrampolineLayout

# rel32 reach kept by the assembler and the relocator (bodies.assemble, relocate)
_REL32_REACH = (1 << 31) - (1 << 16)
_PARAMETERS = ("address", "counter", "base")
# A template covers the encodings of far values only (a rel32 beyond a signed byte, a
# 64-bit address beyond 32 bits): a nearer value at apply is left to the assembler.
_FAR = ("rel32", "imm64")
# One number changed at a time by this much: it changes every byte of a 4-byte field
# (0x11 or 0x12 a byte, with the carry; 1 or 2 at the top), staying in reach.
_STEP = 0x0111_1111
# Every number shifted by this much: a field relative to the trampoline stays the
# same, an absolute 8-byte field changes in at least its 6 low bytes.
_SHIFT = 0x1111_1111_1111
# Places a template is derived at and proved at: PIE-like addresses, the counter
# in the cave's first page below the trampoline, the module within 2 GiB.
DERIVE_AT = (0x5512_3400_1230, 0x5512_3400_1000 - 0x0E00, 0x5512_7650_0000)
PROVE_AT = (
    (0x7F3A_0000_2468, 0x7F3A_0000_1000 - 0x0C40, 0x7F3A_5AB0_0000),
    (0x7FFE_C123_4FF8, 0x7FFE_C123_4000 - 0x0500, 0x7FFE_9000_7000),  # module below
)


class Field(NamedTuple):
    """`width` bytes at `offset`: `address * a + counter * c + base * b + addend`."""

    offset: int
    width: int  # 4 or 8
    address: int  # -1, 0 or 1
    counter: int
    base: int
    addend: int
    kind: str  # the value's size class at build (see `size_class`)


class RecordedSite(NamedTuple):
    """A site as an artifact records it: where each displaced instruction starts is
    known, so nothing is decoded (`arch.base.Site`)."""

    address: int
    original: bytes
    starts: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.original)

    @property
    def end(self) -> int:
        return self.address + len(self.original)


class TrampolineTemplate(NamedTuple):
    """A trampoline for one site, relative to the three numbers a process decides."""

    code: bytes  # as laid out at `DERIVE_AT`; the fields are filled in by `place`
    fields: tuple[Field, ...]
    body: tuple[int, int]  # the body's range, from the trampoline's start
    copies: tuple[int, ...]  # each relocated copy, then the jump back, from the start
    skip_red_zone: bool
    starts: tuple[int, ...] = ()  # each displaced instruction, from the site's start

    def place(self, address: int, counter: int, base: int) -> TrampolineLayout | None:
        """The trampoline at `address` (counter at `counter`, module at `base`); None if
        a value falls outside what `derive` proved (lay it out with the assembler)."""
        code = bytearray(self.code)
        for f in self.fields:
            mask = (1 << (8 * f.width)) - 1
            value = (f.address * address + f.counter * counter + f.base * base + f.addend) & mask
            if size_class(value, f.width) != f.kind:
                return None
            code[f.offset : f.offset + f.width] = value.to_bytes(f.width, "little")
        return TrampolineLayout(
            address,
            bytes(code),
            (address + self.body[0], address + self.body[1]),
            tuple(address + c for c in self.copies),
            self.skip_red_zone,
        )

    @property
    def counts(self) -> bool:
        """The body counts blocked events: it refers to its counter (`derive` checks
        that this is what the patchlet says)."""
        return any(f.counter for f in self.fields)

    def site(self, address: int, original: bytes) -> RecordedSite:
        """The site this template's trampoline displaces, at `address`."""
        return RecordedSite(address, original, tuple(address + s for s in self.starts))


def size_class(value: int, width: int) -> str | None:
    """The encoding class of a field's value (unsigned, `width` bytes): what an
    assembler's choice of encoding depends on. None: out of reach."""
    signed = value - (1 << (8 * width)) if value >> (8 * width - 1) else value
    if width == 4:
        if -128 <= signed < 128:
            return "rel8"
        return "rel32" if -_REL32_REACH <= signed < _REL32_REACH else None
    return "imm32" if -(1 << 31) <= signed < (1 << 32) else "imm64"


def derive(lay_out: Callable[[int, int, int], TrampolineLayout]) -> TrampolineTemplate | None:
    """The template of the trampolines `lay_out(address, counter, base)` builds, proved
    to reproduce them exactly at `PROVE_AT`; None if they do not follow the model
    (different lengths, fields that are not linear, a value near a class boundary)."""
    first = lay_out(*DERIVE_AT)
    code = first.code
    moved: dict[str, bytes] = {}
    steps = {}
    for i, name in enumerate(_PARAMETERS):
        at = list(DERIVE_AT)
        at[i] += _STEP
        moved[name] = lay_out(*at).code
        steps[name] = _STEP
    shifted = lay_out(*(x + _SHIFT for x in DERIVE_AT)).code
    if any(len(c) != len(code) for c in [*moved.values(), shifted]):
        return None
    fields = []
    position = 0
    while position < len(code):
        if all(c[position] == code[position] for c in [*moved.values(), shifted]):
            position += 1
            continue
        width = 8 if _changed(code, shifted, position + 4, position + 6) else 4
        field = _field(code, moved, shifted, position, width)
        if field is None:
            return None
        fields.append(field)
        position += width
    template = TrampolineTemplate(
        code,
        tuple(fields),
        (first.body[0] - first.address, first.body[1] - first.address),
        tuple(c - first.address for c in first.copies),
        first.skip_red_zone,
    )
    for place in [DERIVE_AT, *PROVE_AT]:
        if template.place(*place) != lay_out(*place):
            return None
    return template


def _changed(code: bytes, other: bytes, start: int, end: int) -> bool:
    return end <= len(code) and code[start:end] != other[start:end]


def _field(
    code: bytes, moved: dict[str, bytes], shifted: bytes, offset: int, width: int
) -> Field | None:
    """The field at `offset`: its coefficients from how it moved with each number."""
    if offset + width > len(code):
        return None
    mask = (1 << (8 * width)) - 1

    def value(data: bytes) -> int:
        return int.from_bytes(data[offset : offset + width], "little")

    base_value = value(code)
    coefficients = []
    for name in _PARAMETERS:
        change = (value(moved[name]) - base_value) & mask
        found = {0: 0, _STEP & mask: 1, -_STEP & mask: -1}.get(change)
        if found is None:
            return None
        coefficients.append(found)
    total = sum(coefficients)
    if (value(shifted) - base_value) & mask != (total * _SHIFT) & mask:
        return None
    a, c, b = coefficients
    addend = (base_value - a * DERIVE_AT[0] - c * DERIVE_AT[1] - b * DERIVE_AT[2]) & mask
    kind = size_class(base_value, width)
    if kind not in _FAR:
        return None  # at the derivation places every value is far: something else varies
    return Field(offset, width, a, c, b, addend, kind)
