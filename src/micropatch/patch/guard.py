"""Declarative guards: `when = "esi > 64"`, `then = "return -1"`, compiled to assembly.

A guard is a condition over the registers and memory at the patched location,
and an action taken when it holds. The generated code saves the flags and two
scratch registers, evaluates the condition, restores them, then either takes
the action or falls through to the displaced instructions, so a guard changes
no register or flag unless its action says so.

Values are compared as mathematical integers. Every operand has a type that
says how its bits are read: a 64-bit register is an i64, a 32-bit register an
i32, a memory operand names its own (`u32[rdi+8]`), and a cast (`(u64)rsi`)
reads the low bits of its operand as another type. So `(u64)rsi > -1` is
always true and `rsi < 0x8000000000000000` always true: no C promotion rules.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import NoReturn

from micropatch.elf.location import parse_location
from micropatch.errors import PatchFormatError

RED_ZONE = 128  # the engine steps over it before a body that writes the stack


class GuardError(PatchFormatError):
    """A guard's `when` or `then` does not parse or cannot be compiled here."""


# --- types and registers ----------------------------------------------------


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
# Scratch registers, most preferred first: ones compilers rarely keep live
# across a function's body come first, to keep the guard's code short.
_SCRATCH_ORDER = (
    "r11", "r10", "rax", "rcx", "rdx", "r9", "r8", "rsi", "rdi",
    "rbx", "rbp", "r12", "r13", "r14", "r15",
)  # fmt: skip

_LITERAL_MIN = -(1 << 63)
_LITERAL_END = 1 << 64


def _name(register: str, bits: int) -> str:
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


# --- parsing `when` ---------------------------------------------------------

_TOKEN = re.compile(
    r"\s*(?:(?P<number>0[xX][0-9a-fA-F]+|[0-9]+)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<punct>\|\||&&|<=|>=|==|!=|[<>!()\[\]+\-*]))"
)
_CONDITION_HELP = (
    "a guard condition compares registers, memory and numbers: "
    "e.g. 'esi > 64', 'rsi < 0 || rdx < 0', 'u32[rdi+8] >= (u64)rcx', '!rdi'"
)


def parse_when(text: str) -> Condition:
    """Parse a `when` condition; GuardError saying where and why if it is not one."""
    return _Parser(text).condition()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens: list[tuple[str, str, int]] = []
        pos = 0
        stripped = text.rstrip()
        while pos < len(stripped):
            match = _TOKEN.match(stripped, pos)
            if match is None:
                column = pos + len(stripped[pos:]) - len(stripped[pos:].lstrip())
                self._fail(f"unexpected character {stripped[column]!r}", column)
            kind = match.lastgroup
            assert kind is not None
            self.tokens.append((kind, match.group(kind), match.start(kind)))
            pos = match.end()
        self.pos = 0

    def _fail(self, problem: str, column: int | None = None) -> NoReturn:
        if column is None:
            column = self.tokens[self.pos][2] if self.pos < len(self.tokens) else len(self.text)
        if not self.text.strip():
            where = ""
        elif column >= len(self.text.rstrip()):
            where = " at the end"
        else:
            where = f" at column {column + 1}"
        raise GuardError(f"{self.text!r}: {problem}{where}; {_CONDITION_HELP}")

    def _peek(self, ahead: int = 0) -> tuple[str, str]:
        index = self.pos + ahead
        if index < len(self.tokens):
            return self.tokens[index][0], self.tokens[index][1]
        return "end", "end of the condition"

    def _accept(self, punct: str) -> bool:
        if self._peek() == ("punct", punct):
            self.pos += 1
            return True
        return False

    def _expect(self, punct: str) -> None:
        if not self._accept(punct):
            self._fail(f"expected {punct!r}, found {self._peek()[1]!r}")

    def condition(self) -> Condition:
        if not self.tokens:
            self._fail("the condition is empty")
        result = self._or()
        if self.pos < len(self.tokens):
            value = self._peek()[1]
            hint = " (chain comparisons with && or ||)" if value in COMPARISONS else ""
            self._fail(f"unexpected {value!r}{hint}")
        return result

    def _or(self) -> Condition:
        left = self._and()
        while self._accept("||"):
            left = Or(left, self._and())
        return left

    def _and(self) -> Condition:
        left = self._unary()
        while self._accept("&&"):
            left = And(left, self._unary())
        return left

    def _unary(self) -> Condition:
        if self._accept("!"):
            return Not(self._unary())
        if self._peek() == ("punct", "(") and not self._cast_ahead():
            self.pos += 1
            inner = self._or()
            self._expect(")")
            return inner
        left = self._operand()
        kind, value = self._peek()
        if kind == "punct" and value in COMPARISONS:
            self.pos += 1
            return Compare(value, left, self._operand())
        return Truth(left)

    def _cast_ahead(self) -> bool:
        kind, value = self._peek(1)
        return kind == "name" and value.lower() in TYPES and self._peek(2) == ("punct", ")")

    def _operand(self) -> Operand:
        kind, value = self._peek()
        if self._peek() == ("punct", "(") and self._cast_ahead():
            type_ = TYPES[self._peek(1)[1].lower()]
            self.pos += 3
            if self._peek()[0] == "number" or self._peek() == ("punct", "-"):
                self._fail("a cast applies to a register or memory operand, not a number")
            inner = self._operand()
            assert not isinstance(inner, Literal)
            return Cast(type_, inner)
        if (kind == "punct" and value == "-") or kind == "number":
            return Literal(self._literal())
        if kind == "name":
            lowered = value.lower()
            if lowered in TYPES and self._peek(1) == ("punct", "["):
                self.pos += 2
                return self._memory(TYPES[lowered])
            if lowered in REGISTERS_64 or lowered in REGISTERS_32:
                self.pos += 1
                return Register(lowered)
            if lowered == "esp":
                self._fail("esp is only the low half of the stack pointer: use rsp")
            if lowered in TYPES:
                self._fail(f"expected '[' after {value!r} (memory is read as {lowered}[reg+disp])")
            self._fail(
                f"unknown register {value!r} (registers are rax..r15 and eax..r15d; "
                "read memory as u32[rdi+8], narrower values with a cast such as (u8)eax)"
            )
        if value == "[":
            self._fail("memory needs a type: write u32[...], i64[...], u8[...]")
        self._fail(f"expected a register, a memory operand or a number, found {value!r}")

    def _literal(self) -> int:
        negative = self._accept("-")
        kind, text = self._peek()
        if kind != "number":
            self._fail(f"expected a number after '-', found {text!r}")
        if len(text) > 1 and text[0] == "0" and text[1] not in "xX":
            self._fail(f"{text} has a leading zero; write a decimal without it or a 0x number")
        value = int(text, 0)
        value = -value if negative else value
        if not _LITERAL_MIN <= value < _LITERAL_END:
            self._fail(f"{'-' if negative else ''}{text} does not fit in 64 bits")
        self.pos += 1
        return value

    def _memory(self, type_: IntType) -> Memory:
        base = self._register64("a base register")
        index: str | None = None
        scale = 1
        disp = 0
        while True:
            if self._accept("]"):
                break
            if self._accept("+"):
                negative = False
            elif self._accept("-"):
                negative = True
            else:
                found = self._peek()[1]
                self._fail(f"expected '+', '-' or ']' in a memory operand, found {found!r}")
            kind, value = self._peek()
            if kind == "number":
                disp += -self._literal() if negative else self._literal()
            elif kind == "name" and index is None and not negative:
                index = self._register64("an index register")
                if index == "rsp":
                    self._fail("rsp cannot be an index register", self.tokens[self.pos - 1][2])
                if self._accept("*"):
                    kind, text = self._peek()
                    if kind != "number" or text not in ("1", "2", "4", "8"):
                        self._fail(f"scale must be 1, 2, 4 or 8, found {text!r}")
                    scale = int(text)
                    self.pos += 1
            else:
                self._fail(f"expected a displacement (a number), found {value!r}")
        if not -(1 << 31) <= disp < 1 << 31:
            self._fail(f"displacement {disp:#x} does not fit in 32 bits")
        return Memory(type_, base, index, scale, disp)

    def _register64(self, what: str) -> str:
        kind, value = self._peek()
        if kind != "name" or value.lower() not in REGISTERS_64:
            self._fail(f"expected {what} (a 64-bit register such as rdi), found {value!r}")
        self.pos += 1
        return value.lower()


# --- parsing `then` ---------------------------------------------------------


@dataclass(frozen=True)
class Jump:
    location: str


@dataclass(frozen=True)
class Return:
    value: int | None  # None: leave rax as it is (a void function)


@dataclass(frozen=True)
class Action:
    """What `then` says: count the event as blocked or not, then jump or return."""

    blocked: bool
    outcome: Jump | Return


_THEN_HELP = (
    "expected 'jump LOCATION', 'return VALUE' or 'return', optionally preceded by "
    "'blocked;' (e.g. 'jump parse_error', 'blocked; return -1')"
)
_INTEGER = re.compile(r"-?\s*(?:0[xX][0-9a-fA-F]+|0|[1-9][0-9]*)")


def parse_then(text: str) -> Action:
    """Parse a `then` action; GuardError if it is not one."""
    statements = [s.strip() for s in text.split(";")]
    if statements and not statements[-1] and len(statements) > 1:
        statements.pop()  # a trailing ';'
    blocked = len(statements) == 2 and statements[0].lower() == "blocked"
    if blocked:
        statements.pop(0)
    if len(statements) != 1 or not statements[0]:
        raise GuardError(f"{text!r}: {_THEN_HELP}")
    statement = statements[0]
    word, _, rest = statement.partition(" ")
    rest = rest.strip()
    word = word.lower()
    if word == "jump" and rest:
        try:
            parse_location(rest)
        except PatchFormatError as exc:
            raise GuardError(f"{text!r}: jump {exc}") from None
        return Action(blocked, Jump(rest))
    if word == "return":
        if not rest:
            return Action(blocked, Return(None))
        if not _INTEGER.fullmatch(rest):
            raise GuardError(
                f"{text!r}: the return value must be an integer (decimal or 0x hex, "
                f"no leading zeros), found {rest!r}"
            )
        value = int(rest.replace(" ", ""), 0)
        if not _LITERAL_MIN <= value < _LITERAL_END:
            raise GuardError(f"{text!r}: {rest} does not fit in 64 bits")
        return Action(blocked, Return(value))
    if word in ("jmp", "goto") and rest:
        raise GuardError(f"{text!r}: write 'jump {rest}'")
    raise GuardError(f"{text!r}: {_THEN_HELP}")


# --- code generation --------------------------------------------------------

_SIGNED_JCC = {"<": "jl", "<=": "jle", ">": "jg", ">=": "jge", "==": "je", "!=": "jne"}
_UNSIGNED_JCC = {"<": "jb", "<=": "jbe", ">": "ja", ">=": "jae", "==": "je", "!=": "jne"}
_NEGATED = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}
# Comparisons that hold when the left side is greater / smaller than the right.
_HOLD_IF_GREATER = frozenset({">", ">=", "!="})
_HOLD_IF_SMALLER = frozenset({"<", "<=", "!="})
_MIRRORED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_IMM32_MIN = -(1 << 31)
_IMM32_END = 1 << 31
_SAVED = 3  # pushfq + two scratch registers


def _hex(value: int) -> str:
    return f"-{-value:#x}" if value < 0 else f"{value:#x}"


class _Generator:
    """Branching code for a condition, with the stack shifted by `shift` bytes
    from the site's rsp and two scratch registers."""

    def __init__(self, scratch: tuple[str, str], shift: int) -> None:
        self.scratch = scratch
        self.shift = shift
        self.lines: list[str] = []
        self.labels = 0

    def label(self) -> str:
        self.labels += 1
        return f"mp_guard_{self.labels}"

    def emit(self, line: str) -> None:
        self.lines.append(line)

    def jump_if(self, condition: Condition, target: str, when: bool) -> None:
        """Jump to `target` if `condition` evaluates to `when`; else fall through."""
        if isinstance(condition, Not):
            self.jump_if(condition.operand, target, not when)
        elif isinstance(condition, And | Or):
            # `a && b` jumps on false as soon as one part is false; on true only
            # if both are. `a || b` is the mirror image.
            short = isinstance(condition, And) != when
            if short:
                self.jump_if(condition.left, target, when)
                self.jump_if(condition.right, target, when)
            else:
                skip = self.label()
                self.jump_if(condition.left, skip, not when)
                self.jump_if(condition.right, target, when)
                self.emit(f"{skip}:")
        elif isinstance(condition, Truth):
            register = self.load(condition.operand, self.scratch[0])[0]
            self.emit(f"test {register}, {register}")
            self.emit(f"{'jne' if when else 'je'} {target}")
        else:
            self.compare(condition, target, when)

    def compare(self, condition: Compare, target: str, when: bool) -> None:
        op = condition.op if when else _NEGATED[condition.op]
        left_operand, right_operand = condition.left, condition.right
        if isinstance(left_operand, Literal) and not isinstance(right_operand, Literal):
            left_operand, right_operand, op = right_operand, left_operand, _MIRRORED[op]
        if isinstance(right_operand, Literal) and _IMM32_MIN <= right_operand.value < _IMM32_END:
            # The common case, `esi > 64`: compare with an immediate.
            left, left_u64 = self.load(left_operand, self.scratch[0])
            if left_u64 and right_operand.value < 0:
                if op in _HOLD_IF_GREATER:  # a u64 is greater than any negative number
                    self.emit(f"jmp {target}")
                return
            jcc = (_UNSIGNED_JCC if left_u64 else _SIGNED_JCC)[op]
            self.emit(f"cmp {left}, {_hex(right_operand.value)}")
            self.emit(f"{jcc} {target}")
            return
        left, left_u64 = self.load(left_operand, self.scratch[0])
        right, right_u64 = self.load(right_operand, self.scratch[1])
        if left_u64 == right_u64:
            jcc = (_UNSIGNED_JCC if left_u64 else _SIGNED_JCC)[op]
            self.emit(f"cmp {left}, {right}")
            self.emit(f"{jcc} {target}")
            return
        # One side is a u64, the other signed. If the signed side is negative
        # the answer is known; otherwise both are in [0, 2**64): compare unsigned.
        signed, holds = (right, _HOLD_IF_GREATER) if left_u64 else (left, _HOLD_IF_SMALLER)
        skip = self.label()
        self.emit(f"test {signed}, {signed}")
        self.emit(f"js {target if op in holds else skip}")
        self.emit(f"cmp {left}, {right}")
        self.emit(f"{_UNSIGNED_JCC[op]} {target}")
        self.emit(f"{skip}:")

    def load(self, operand: Operand, register: str) -> tuple[str, bool]:
        """Put the operand's value, extended to 64 bits, in `register`; return
        the register and whether the value must be read as unsigned (a u64)."""
        if isinstance(operand, Literal):
            self.emit(f"mov {register}, {_hex(operand.value)}")
            return register, operand.value >= 1 << 63
        if isinstance(operand, Register):
            if operand.name == "rsp":
                self.emit(f"lea {register}, [rsp + {self.shift:#x}]")
            elif operand.name in REGISTERS_64:
                self.emit(f"mov {register}, {operand.name}")
            else:
                self.emit(f"movsxd {register}, {operand.name}")
            return register, False
        if isinstance(operand, Memory):
            address = self.address(operand)
            self.emit(_extend(register, operand.type, address))
            return register, operand.type == TYPES["u64"]
        self.load(operand.operand, register)
        if operand.type.bits < 64:
            self.emit(_extend(register, operand.type, None))
        return register, operand.type == TYPES["u64"]

    def address(self, memory: Memory) -> str:
        disp = memory.disp + (self.shift if memory.base == "rsp" else 0)
        if not -(1 << 31) <= disp < 1 << 31:
            raise GuardError(f"displacement {disp:#x} does not fit in 32 bits")
        text = memory.base
        if memory.index:
            text += f" + {memory.index}*{memory.scale}"
        if disp:
            text += f" + {disp:#x}" if disp > 0 else f" - {-disp:#x}"
        return f"[{text}]"


_PTR = {8: "byte", 16: "word", 32: "dword", 64: "qword"}


def _extend(register: str, type_: IntType, memory: str | None) -> str:
    """One instruction: `register` = the `type_.bits`-bit value at `memory`
    (or in the register's own low bits) extended as `type_` says."""
    source = f"{_PTR[type_.bits]} ptr {memory}" if memory else _name(register, type_.bits)
    if type_.bits == 64:
        return f"mov {register}, {source}"
    if type_.bits == 32:
        if type_.signed:
            return f"movsxd {register}, {source}"
        return f"mov {_name(register, 32)}, {source}"
    if type_.signed:
        return f"movsx {register}, {source}"
    return f"movzx {_name(register, 32)}, {source}"


AT_ENTRY_ONLY = (
    "is only possible at a function's entry (offset 0 of a function, where the "
    "return address is on top of the stack); mid-function the stack frame is unknown, "
    "so jump to the function's existing error path instead (jump LOCATION)"
)


def guard_source(
    when: Condition, then: Action, *, at_entry: bool, counter: int | None = None
) -> str:
    """Assembly for a guard, to be assembled where the trampoline body runs.

    It relies on the engine's red-zone rule: the code pushes, so the engine
    moves rsp down by RED_ZONE before it, except at a function's entry
    (`at_entry`). `counter` is the address of the patchlet's 64-bit `blocked`
    counter, required when the action says `blocked`.
    """
    if isinstance(then.outcome, Return) and not at_entry:
        raise GuardError(f"then: 'return' {AT_ENTRY_ONLY}")
    if then.blocked and counter is None:
        raise GuardError(
            "then: 'blocked' needs a blocked-event counter, which this engine does not "
            "provide yet; remove 'blocked;'"
        )
    used = registers_used(when)
    free = [r for r in _SCRATCH_ORDER if r not in used]
    if len(free) < 2:
        raise GuardError("when: the condition reads too many registers to leave two for scratch")
    scratch = (free[0], free[1])
    red_zone = 0 if at_entry else RED_ZONE
    generator = _Generator(scratch, _SAVED * 8 + red_zone)
    emit = generator.emit
    restore = [f"pop {scratch[1]}", f"pop {scratch[0]}", "popfq"]
    emit("pushfq")
    emit(f"push {scratch[0]}")
    emit(f"push {scratch[1]}")
    generator.jump_if(when, "mp_guard_false", False)
    if then.blocked:
        assert counter is not None
        emit(f"mov {scratch[0]}, {counter:#x}")
        emit(f"lock inc qword ptr [{scratch[0]}]")
    generator.lines += restore
    outcome = then.outcome
    if isinstance(outcome, Jump):
        if red_zone:
            emit(f"lea rsp, [rsp + {red_zone:#x}]")
        emit(f"jmp {{{outcome.location}}}")
    else:
        if outcome.value is not None:
            emit(f"mov rax, {_hex(outcome.value)}")
        emit("ret")
    emit("mp_guard_false:")
    generator.lines += restore
    return "\n".join(generator.lines) + "\n"
