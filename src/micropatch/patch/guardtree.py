"""The syntax tree of a guard's condition: integer types, registers, operands.

`patch.guard` parses text into it; `bodies.guard` compiles it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class IntType:
    """An integer type: `i32`, `u64`, ..."""

    signed: bool
    bits: int

    def __str__(self) -> str:
        return f"{'i' if self.signed else 'u'}{self.bits}"

    def read(self, value: int) -> int:
        """The mathematical value of the low `bits` bits of `value` read as this type."""
        value &= (1 << self.bits) - 1
        if self.signed and value >> (self.bits - 1):
            value -= 1 << self.bits
        return value


TYPES = {f"{s}{b}": IntType(s == "i", b) for s in "iu" for b in (8, 16, 32, 64)}

# Each register's names by width: 64, 32, 16, 8 bits.
_NAMES: dict[str, tuple[str, str, str, str]] = {
    "rax": ("rax", "eax", "ax", "al"),
    "rbx": ("rbx", "ebx", "bx", "bl"),
    "rcx": ("rcx", "ecx", "cx", "cl"),
    "rdx": ("rdx", "edx", "dx", "dl"),
    "rsi": ("rsi", "esi", "si", "sil"),
    "rdi": ("rdi", "edi", "di", "dil"),
    "rbp": ("rbp", "ebp", "bp", "bpl"),
    "rsp": ("rsp", "esp", "sp", "spl"),
    **{f"r{n}": (f"r{n}", f"r{n}d", f"r{n}w", f"r{n}b") for n in range(8, 16)},
}
REGISTERS_64 = frozenset(_NAMES)
REGISTERS_32 = frozenset(names[1] for names in _NAMES.values()) - {"esp"}
_FULL = {names[1]: full for full, names in _NAMES.items()}
_WIDTH_INDEX = {64: 0, 32: 1, 16: 2, 8: 3}
LITERAL_MIN = -(1 << 63)
LITERAL_END = 1 << 64


def register_name(register: str, bits: int) -> str:
    """The name of `register` (a 64-bit name) at `bits` width: `rsi`, 32 -> `esi`."""
    return _NAMES[register][_WIDTH_INDEX[bits]]


# --- syntax tree ------------------------------------------------------------


@dataclass(frozen=True)
class Register:
    """A register read whole: `rsi` (an i64) or `esi` (an i32)."""

    name: str

    @property
    def full(self) -> str:
        return _FULL.get(self.name, self.name)

    @property
    def type(self) -> IntType:
        return TYPES["i64"] if self.name in REGISTERS_64 else TYPES["i32"]


@dataclass(frozen=True)
class Memory:
    """`type[base + index*scale + disp]`."""

    type: IntType
    base: str
    index: str | None
    scale: int
    disp: int


@dataclass(frozen=True)
class Literal:
    value: int


@dataclass(frozen=True)
class Cast:
    type: IntType
    operand: Register | Memory | Cast


Operand = Register | Memory | Literal | Cast


@dataclass(frozen=True)
class Compare:
    op: str  # < <= > >= == !=
    left: Operand
    right: Operand


@dataclass(frozen=True)
class Truth:
    """An operand alone: true when it is not zero."""

    operand: Operand


@dataclass(frozen=True)
class Not:
    operand: Condition


@dataclass(frozen=True)
class And:
    left: Condition
    right: Condition


@dataclass(frozen=True)
class Or:
    left: Condition
    right: Condition


Condition = Compare | Truth | Not | And | Or

COMPARISONS = ("<", "<=", ">", ">=", "==", "!=")


def registers_used(condition: Condition) -> set[str]:
    """The 64-bit names of every register the condition reads."""
    found: set[str] = set()

    def operand(o: Operand) -> None:
        if isinstance(o, Register):
            found.add(o.full)
        elif isinstance(o, Memory):
            found.add(o.base)
            if o.index:
                found.add(o.index)
        elif isinstance(o, Cast):
            operand(o.operand)

    def walk(c: Condition) -> None:
        if isinstance(c, Compare):
            operand(c.left)
            operand(c.right)
        elif isinstance(c, Truth):
            operand(c.operand)
        elif isinstance(c, Not):
            walk(c.operand)
        else:
            walk(c.left)
            walk(c.right)

    walk(condition)
    return found
