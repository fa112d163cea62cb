"""The text of patchlet code: comments, `{location}` references, and the
subset of Intel syntax handed to keystone.

The subset exists because keystone 0.9.2 loops forever on some malformed
statements (a lone `[`, `.byte |`, `label: %`) and silently accepts others
(`mov eax, [` assembles). Every statement is parsed by a small grammar first,
so what reaches keystone is well-formed: instructions with register, number,
symbol and memory operands, labels, and integer data directives.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from micropatch.errors import AssemblyError

_REFERENCE = re.compile(r"\{\{|\}\}|\{([^{}\n]*)\}|[{}]")
_RIP_BEFORE = re.compile(r"\[\s*rip\s*\+\s*$", re.IGNORECASE)
_RIP_AFTER = re.compile(r"\s*\]")
_RIP_PLUS_END = re.compile(r"rip\s*\+\s*$", re.IGNORECASE)

_TOKEN = re.compile(
    r"\s*(?:(?P<number>0[xX][0-9a-fA-F]+|[0-9]+)"
    r"|(?P<name>[A-Za-z_.][A-Za-z0-9_.]*)"
    r"|(?P<punct>[\[\](),:+\-*{}]))"
)
_OCTAL = re.compile(r"0[0-9]+")
_SIZES = frozenset(
    [
        "byte",
        "word",
        "dword",
        "qword",
        "tbyte",
        "fword",
        "xmmword",
        "ymmword",
        "zmmword",
        "oword",
        "xword",
    ]
)
_PREFIXES = frozenset(
    [
        "lock",
        "rep",
        "repe",
        "repz",
        "repne",
        "repnz",
        "bnd",
        "notrack",
        "xacquire",
        "xrelease",
        "data16",
        "addr32",
    ]
)
_DATA_DIRECTIVES = frozenset([".byte", ".short", ".word", ".value", ".long", ".int", ".quad"])


@dataclass(frozen=True)
class Reference:
    """A `{location}` in code. `rip` marks the form `[rip + {location}]`,
    whose displacement is computed rather than written literally."""

    location: str
    rip: bool


@dataclass(frozen=True)
class Line:
    """One source line: its number (from 1), its text for messages, and its
    content with comments removed, as literal text and references in turn."""

    number: int
    text: str
    pieces: tuple[str | Reference, ...]

    @property
    def is_blank(self) -> bool:
        return all(isinstance(p, str) and not p.strip() for p in self.pieces)

    def describe(self) -> str:
        return f"line {self.number} ({self.text.strip()!r})"


def parse_code(code: str) -> list[Line]:
    """Split code into lines, dropping `#` comments and separating references.

    `;` is not a comment: keystone reads it as a statement separator. `{{` and
    `}}` stand for literal braces (AVX-512 masks: `{{k1}}`).
    """
    lines = []
    for number, text in enumerate(code.splitlines(), start=1):
        content = text.split("#", 1)[0]
        pieces: list[str | Reference] = []
        literal = ""
        pos = 0
        for match in _REFERENCE.finditer(content):
            literal += content[pos : match.start()]
            pos = match.end()
            token = match.group(0)
            if token in ("{{", "}}"):
                literal += token[0]
            elif match.group(1) is None:
                raise AssemblyError(
                    f"line {number} ({text.strip()!r}): unmatched {token!r}; write "
                    "references as {symbol+0xN} and literal braces as {{ and }}"
                )
            else:
                after = content[pos:]
                rip = bool(_RIP_BEFORE.search(literal)) and bool(_RIP_AFTER.match(after))
                if not rip and _RIP_PLUS_END.search(literal):
                    raise AssemblyError(
                        f"line {number} ({text.strip()!r}): write RIP-relative references "
                        "as [rip + {symbol+0xN}], with any offset inside the braces"
                    )
                pieces += [literal, Reference(match.group(1).strip(), rip)]
                literal = ""
        pieces.append(literal + content[pos:])
        lines.append(Line(number, text, tuple(pieces)))
    return lines


def syntax_problem(statement: str) -> str | None:
    """Why `statement` (one `;`-separated statement, references already
    substituted) is outside the accepted syntax, or None if it is inside."""
    tokens = []
    pos = 0
    statement = statement.rstrip()
    while pos < len(statement):
        match = _TOKEN.match(statement, pos)
        if match is None:
            return f"unexpected character {statement[pos:].lstrip()[0]!r}"
        kind = match.lastgroup
        assert kind is not None
        if kind == "number" and _OCTAL.fullmatch(match.group(kind)):
            return (
                f"{match.group(kind)} has a leading zero, which keystone reads as octal; "
                "write a decimal without it or a 0x hex number"
            )
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    try:
        _Statement(tokens).parse()
    except _SyntaxProblem as problem:
        return str(problem)
    return None


class _SyntaxProblem(Exception):
    pass


class _Statement:
    """Recursive descent over one statement's tokens:

    statement := (NAME ':')* [directive | instruction]
    directive := DATA_DIRECTIVE expr (',' expr)*
    instruction := PREFIX* NAME [operand (',' operand)*]
    operand := [SIZE 'ptr'] ([NAME ':'] '[' [NAME ':'] expr ']' | expr) decorator*
    decorator := '{' (NAME | NUMBER | '-')+ '}'
    expr := unary (('+' | '-' | '*') unary)*
    unary := ('+' | '-') unary | NUMBER | NAME | '(' expr ')'
    """

    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self._tokens = tokens
        self._pos = 0

    def parse(self) -> None:
        while self._peek(0)[0] == "name" and self._peek(1) == ("punct", ":"):
            self._pos += 2
        if self._at_end():
            return
        kind, value = self._next()
        if kind != "name":
            raise _SyntaxProblem(f"expected an instruction, found {value!r}")
        if value.lower() in _DATA_DIRECTIVES:
            self._list(self._expr)
        elif value.startswith("."):
            raise _SyntaxProblem(
                f"directive {value} is not supported; only integer data directives "
                f"({', '.join(sorted(_DATA_DIRECTIVES))})"
            )
        else:
            while value.lower() in _PREFIXES and not self._at_end():
                kind, value = self._next()
                if kind != "name":
                    raise _SyntaxProblem(f"expected an instruction after a prefix, found {value!r}")
            if not self._at_end():
                self._list(self._operand)
        if not self._at_end():
            raise _SyntaxProblem(f"unexpected {self._peek(0)[1]!r}")

    def _list(self, item: Callable[[], None]) -> None:
        item()
        while self._accept(","):
            item()

    def _operand(self) -> None:
        if self._peek(0)[1].lower() in _SIZES and self._peek(1)[1].lower() == "ptr":
            self._pos += 2
        segment = self._peek(0)[0] == "name" and self._peek(1) == ("punct", ":")
        if segment:
            self._pos += 2
        if segment or self._peek(0) == ("punct", "["):
            self._expect("[")
            if self._peek(0)[0] == "name" and self._peek(1) == ("punct", ":"):
                self._pos += 2
            self._expr()
            self._expect("]")
        else:
            self._expr()
        while self._accept("{"):
            self._decorator_part()
            while not self._accept("}"):
                self._decorator_part()

    def _decorator_part(self) -> None:
        kind, value = self._next()
        if kind not in ("name", "number") and value != "-":
            raise _SyntaxProblem(f"unexpected {value!r} in a {{...}} decorator")

    def _expr(self) -> None:
        self._unary()
        while self._peek(0)[1] in ("+", "-", "*"):
            self._pos += 1
            self._unary()

    def _unary(self) -> None:
        kind, value = self._next()
        if value in ("+", "-"):
            self._unary()
        elif value == "(":
            self._expr()
            self._expect(")")
        elif kind not in ("name", "number"):
            raise _SyntaxProblem(f"expected a register, number or symbol, found {value!r}")

    def _peek(self, ahead: int) -> tuple[str, str]:
        index = self._pos + ahead
        return self._tokens[index] if index < len(self._tokens) else ("end", "end of statement")

    def _next(self) -> tuple[str, str]:
        token = self._peek(0)
        if token[0] == "end":
            raise _SyntaxProblem("statement ends too early")
        self._pos += 1
        return token

    def _accept(self, punct: str) -> bool:
        if self._peek(0) == ("punct", punct):
            self._pos += 1
            return True
        return False

    def _expect(self, punct: str) -> None:
        if not self._accept(punct):
            raise _SyntaxProblem(f"expected {punct!r}, found {self._peek(0)[1]!r}")

    def _at_end(self) -> bool:
        return self._pos >= len(self._tokens)


BLOCKED_REFERENCE = "@blocked"
"""`{@blocked}` in assembly: the address of the patchlet's blocked-event counter, so
`lock inc qword ptr [rip + {@blocked}]` records an exploit attempt in one instruction."""


def references(code: str) -> list[str]:
    """The distinct `{location}` references in code, in order of first use."""
    found: dict[str, None] = {}
    for line in parse_code(code):
        for piece in line.pieces:
            if isinstance(piece, Reference):
                found.setdefault(piece.location, None)
    return list(found)
