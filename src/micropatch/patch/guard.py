"""Declarative guards: `when = "esi > 64"`, `then = "return -1"`: the syntax.

This module parses a guard into a tree; `micropatch.bodies.guard` compiles it.

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
from micropatch.patch.guardtree import (
    COMPARISONS,
    LITERAL_END,
    LITERAL_MIN,
    REGISTERS_32,
    REGISTERS_64,
    TYPES,
    And,
    Cast,
    Compare,
    Condition,
    IntType,
    Literal,
    Memory,
    Not,
    Operand,
    Or,
    Register,
    Truth,
)


class GuardError(PatchFormatError):
    """A guard's `when` or `then` does not parse or cannot be compiled here."""


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
        if not LITERAL_MIN <= value < LITERAL_END:
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
        if not LITERAL_MIN <= value < LITERAL_END:
            raise GuardError(f"{text!r}: {rest} does not fit in 64 bits")
        return Action(blocked, Return(value))
    if word in ("jmp", "goto") and rest:
        raise GuardError(f"{text!r}: write 'jump {rest}'")
    raise GuardError(f"{text!r}: {_THEN_HELP}")
