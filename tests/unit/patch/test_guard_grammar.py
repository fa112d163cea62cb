"""Guards: the `when` / `then` grammar, parsed, and what it refuses."""

from __future__ import annotations

import re

import pytest

from micropatch.bodies.guard import guard_source
from micropatch.patch.guard import Action, GuardError, Jump, Return, parse_then, parse_when
from micropatch.patch.guardtree import (
    TYPES,
    And,
    Cast,
    Compare,
    Condition,
    Literal,
    Memory,
    Not,
    Or,
    Register,
    Truth,
)

# --- parsing ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "tree"),
    [
        ("esi > 64", Compare(">", Register("esi"), Literal(64))),
        (
            "rsi < 0 || rdx < 0",
            Or(
                Compare("<", Register("rsi"), Literal(0)), Compare("<", Register("rdx"), Literal(0))
            ),
        ),
        (
            "a && b || c".replace("a", "rax").replace("b", "rbx").replace("c", "rcx"),
            Or(And(Truth(Register("rax")), Truth(Register("rbx"))), Truth(Register("rcx"))),
        ),
        (
            "rax || rbx && rcx",
            Or(Truth(Register("rax")), And(Truth(Register("rbx")), Truth(Register("rcx")))),
        ),
        ("!rdi", Not(Truth(Register("rdi")))),
        ("!(rdi == 0)", Not(Compare("==", Register("rdi"), Literal(0)))),
        (
            "u32[rdi+8] >= (u64)rcx",
            Compare(
                ">=", Memory(TYPES["u32"], "rdi", None, 1, 8), Cast(TYPES["u64"], Register("rcx"))
            ),
        ),
        ("i64[rsp+16] != -1", Compare("!=", Memory(TYPES["i64"], "rsp", None, 1, 16), Literal(-1))),
        (
            "U8[RDI + RCX*4 - 0x10] == 0xff",
            Compare("==", Memory(TYPES["u8"], "rdi", "rcx", 4, -16), Literal(255)),
        ),
        (
            "(i8)(u16)eax < 0",
            Compare("<", Cast(TYPES["i8"], Cast(TYPES["u16"], Register("eax"))), Literal(0)),
        ),
        ("r15d <= 0xFFFFFFFFFFFFFFFF", Compare("<=", Register("r15d"), Literal(2**64 - 1))),
        ("r8 > -9223372036854775808", Compare(">", Register("r8"), Literal(-(2**63)))),
        ("((rax))", Truth(Register("rax"))),
        (
            "i16[rbp] < u16[rbp+2]",
            Compare(
                "<",
                Memory(TYPES["i16"], "rbp", None, 1, 0),
                Memory(TYPES["u16"], "rbp", None, 1, 2),
            ),
        ),
    ],
)
def test_parse_when(text: str, tree: Condition) -> None:
    assert parse_when(text) == tree


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", r"the condition is empty"),
        (
            "rsi < 0 ||",
            r"expected a register, a memory operand or a number, found 'end of the condition' at the end",
        ),
        (
            "rsi < ",
            r"expected a register, a memory operand or a number, found 'end of the condition' at the end",
        ),
        ("rsx < 0", r"unknown register 'rsx' \(registers are rax\.\.r15 and eax\.\.r15d"),
        ("ax < 0", r"unknown register 'ax'.*narrower values with a cast such as \(u8\)eax"),
        ("esp < 0", r"esp is only the low half of the stack pointer: use rsp"),
        ("[rdi] == 0", r"memory needs a type: write u32\[\.\.\.\]"),
        ("u32 rdi == 0", r"expected '\[' after 'u32'"),
        ("u32[rdi+] == 0", r"expected a displacement \(a number\), found '\]'"),
        ("u32[8] == 0", r"expected a base register \(a 64-bit register such as rdi\), found '8'"),
        ("u32[edi] == 0", r"expected a base register .* found 'edi'"),
        ("u32[rdi+rsp] == 0", r"rsp cannot be an index register"),
        ("u32[rdi+rcx*3] == 0", r"scale must be 1, 2, 4 or 8, found '3'"),
        ("u32[rdi+0x100000000] == 0", r"displacement 0x100000000 does not fit in 32 bits"),
        ("u32[rdi == 0", r"expected '\+', '-' or '\]' in a memory operand, found '=='"),
        ("rsi < 0 < 5", r"unexpected '<' \(chain comparisons with && or \|\|\) at column 9"),
        ("rsi = 0", r"unexpected character '=' at column 5"),
        ("rsi < 010", r"010 has a leading zero"),
        ("rsi < 0x10000000000000000", r"0x10000000000000000 does not fit in 64 bits"),
        ("rsi < -0x8000000000000001", r"-0x8000000000000001 does not fit in 64 bits"),
        ("(u32)5 < rsi", r"a cast applies to a register or memory operand, not a number"),
        ("(rsi < 0", r"expected '\)', found 'end of the condition' at the end"),
        ("rsi < 0 &", r"unexpected character '&' at column 9"),
        ("rsi < 0 and rdx", r"unexpected 'and' at column 9"),
        ("- rsi < 0", r"expected a number after '-', found 'rsi'"),
    ],
)
def test_when_errors(text: str, message: str) -> None:
    with pytest.raises(GuardError) as err:
        parse_when(text)
    assert re.search(message, str(err.value)), str(err.value)
    assert str(err.value).startswith(repr(text) + ": ")


@pytest.mark.parametrize(
    ("text", "action"),
    [
        ("jump _setimage+0x1a4", Action(False, Jump("_setimage+0x1a4"))),
        ("return -1", Action(False, Return(-1))),
        ("return", Action(False, Return(None))),
        ("RETURN 0x10", Action(False, Return(16))),
        ("blocked; return -1", Action(True, Return(-1))),
        ("blocked ; jump 0x1234;", Action(True, Jump("0x1234"))),
        ("return 18446744073709551615", Action(False, Return(2**64 - 1))),
    ],
)
def test_parse_then(text: str, action: Action) -> None:
    assert parse_then(text) == action


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "",
            r"expected 'jump LOCATION', 'return VALUE' or 'return', optionally preceded by 'blocked;'",
        ),
        ("jump", r"expected 'jump LOCATION'"),
        ("jmp error_path", r"write 'jump error_path'"),
        ("goto error_path", r"write 'jump error_path'"),
        ("jump error path", r"jump 'error path' is not a location"),
        ("jump f-4", r"jump 'f-4' is not a location"),
        ("return x", r"the return value must be an integer .* found 'x'"),
        ("return 010", r"the return value must be an integer"),
        ("return 0x10000000000000000", r"does not fit in 64 bits"),
        ("blocked", r"expected 'jump LOCATION'"),
        ("blocked; blocked; return", r"expected 'jump LOCATION'"),
        ("return -1; blocked", r"expected 'jump LOCATION'"),
    ],
)
def test_then_errors(text: str, message: str) -> None:
    with pytest.raises(GuardError) as err:
        parse_then(text)
    assert re.search(message, str(err.value)), str(err.value)


def test_return_refused_mid_function() -> None:
    with pytest.raises(GuardError, match=r"then: 'return' is only possible at a function's entry"):
        guard_source(parse_when("esi > 64"), parse_then("return -1"), at_entry=False)


def test_blocked_needs_a_counter() -> None:
    with pytest.raises(GuardError, match=r"then: 'blocked' needs a blocked-event counter"):
        guard_source(parse_when("esi > 64"), parse_then("blocked; jump f"), at_entry=True)


def test_too_many_registers() -> None:
    names = [
        "rax",
        "rbx",
        "rcx",
        "rdx",
        "rsi",
        "rdi",
        "rbp",
        "r8",
        "r9",
        "r10",
        "r11",
        "r12",
        "r13",
        "r14",
    ]
    when = parse_when(" || ".join(names))
    with pytest.raises(GuardError, match=r"too many registers to leave two for scratch"):
        guard_source(when, parse_then("jump f"), at_entry=True)
