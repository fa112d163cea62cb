"""Guards: the `when` / `then` grammar, and the code it compiles to, run in unicorn
against a Python evaluation of the same condition."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micropatch.arch.x86_64.constants import RED_ZONE
from micropatch.arch.x86_64.trampoline import writes_stack
from micropatch.bodies.assemble import assemble
from micropatch.bodies.frame import StackContext
from micropatch.bodies.guard import guard_source
from micropatch.bodies.toolchain import Toolchain
from micropatch.errors import PatchFormatError
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
    Operand,
    Or,
    Register,
    Truth,
)
from micropatch.patch.source import parse_patch

from ..arch.emulator import PAGE, REGISTERS, run

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


def test_guard_always_writes_the_stack() -> None:
    """The engine steps over the red zone only for bodies that write the stack;
    the generated code counts on it ([frame+N]) away from an entry."""
    code = assemble(
        guard_source(parse_when("esi > 64"), parse_then("jump f"), at_entry=False),
        CODE,
        lambda _: TARGET,
    )
    assert writes_stack(code, CODE)


# --- the compiled code, in unicorn ------------------------------------------------

CODE = 0x100000
TARGET = 0x200000  # where `jump` goes
RETURN_ADDRESS = 0x300000
DATA = 0x400000  # rbx points into it
STACK = 0x500000  # two pages; rsp at the site is the middle
SITE_RSP = STACK + PAGE
COUNTER = DATA + 0x20
RBX = DATA + 0x800
WINDOW = 0x100  # memory operands reach +-WINDOW around their base
ARITHMETIC = 0x8D5

_GPRS = [name for name in REGISTERS if name not in ("rsp", "rflags")]
_REG32 = {
    "rax": "eax", "rbx": "ebx", "rcx": "ecx", "rdx": "edx", "rsi": "esi", "rdi": "edi",
    "rbp": "ebp", **{f"r{n}": f"r{n}d" for n in range(8, 16)},
}  # fmt: skip
_EDGES = [
    0, 1, 2, 63, 64, 65, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 2**31 - 1, 2**31,
    2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1, 2**64 - 2, 2**64 - 64, 2**64 - 2**31,
]  # fmt: skip
_values = st.sampled_from(_EDGES) | st.integers(0, 2**64 - 1)
_literals = st.sampled_from(
    [*_EDGES, -1, -2, -64, -(2**31), -(2**31) - 1, -(2**63), -(2**32)]
) | st.integers(-(2**63), 2**64 - 1)
# rbx and rsp are bases for memory; rdi a small index. The rest are free.
_FREE = [r for r in _GPRS if r not in ("rbx", "rdi")]


def _registers_operand() -> st.SearchStrategy[Operand]:
    names = _FREE + [_REG32[r] for r in _FREE] + ["rbx", "rdi", "edi", "rsp"]
    return st.sampled_from(names).map(Register)


@st.composite
def _memory(draw: st.DrawFn, at_entry: bool) -> Memory:
    type_ = draw(st.sampled_from(sorted(TYPES.values(), key=str)))
    base = draw(st.sampled_from(["rbx", "rsp"]))
    index = draw(st.sampled_from([None, "rdi"]))
    scale = draw(st.sampled_from([1, 2, 4, 8])) if index else 1
    # Below rsp only the red zone is live, and nothing at a function's entry.
    low = -WINDOW if base == "rbx" else 0 if at_entry else -128
    disp = draw(st.integers(low, WINDOW - 8 - 31 * 8))
    return Memory(type_, base, index, scale, disp)


def _operands(at_entry: bool) -> st.SearchStrategy[Operand]:
    plain = _registers_operand() | _memory(at_entry)
    castable = st.recursive(
        plain,
        lambda inner: st.builds(Cast, st.sampled_from(sorted(TYPES.values(), key=str)), inner),
        max_leaves=2,
    )
    return castable | _literals.map(Literal)


def _conditions(at_entry: bool) -> st.SearchStrategy[Condition]:
    operand = _operands(at_entry)
    leaf = st.builds(
        Compare, st.sampled_from(["<", "<=", ">", ">=", "==", "!="]), operand, operand
    ) | st.builds(Truth, operand)
    return st.recursive(
        leaf,
        lambda inner: (
            st.builds(Not, inner) | st.builds(And, inner, inner) | st.builds(Or, inner, inner)
        ),
        max_leaves=5,
    )


def _text(node: Condition | Operand) -> str:
    """Source text for a tree, fully parenthesised where precedence matters."""
    if isinstance(node, Register):
        return node.name
    if isinstance(node, Literal):
        return str(node.value) if node.value % 3 else hex(node.value).replace("0x-", "-0x")
    if isinstance(node, Memory):
        inside = node.base
        if node.index:
            inside += f" + {node.index}*{node.scale}"
        if node.disp:
            inside += f" + {node.disp:#x}" if node.disp > 0 else f" - {-node.disp:#x}"
        return f"{node.type}[{inside}]"
    if isinstance(node, Cast):
        return f"({node.type}){_text(node.operand)}"
    if isinstance(node, Compare):
        return f"{_text(node.left)} {node.op} {_text(node.right)}"
    if isinstance(node, Truth):
        return _text(node.operand)
    if isinstance(node, Not):
        return f"!({_text(node.operand)})"
    op = "&&" if isinstance(node, And) else "||"
    return f"({_text(node.left)}) {op} ({_text(node.right)})"


def _evaluate(
    node: Condition | Operand, registers: dict[str, int], memory: dict[int, bytes]
) -> int | bool:
    """The reference semantics: every operand a mathematical integer."""
    if isinstance(node, Literal):
        return node.value
    if isinstance(node, Register):
        return node.type.read(registers[node.full])
    if isinstance(node, Memory):
        address = (
            registers[node.base]
            + (registers[node.index] * node.scale if node.index else 0)
            + node.disp
        )
        page = next(p for p in memory if p <= address < p + len(memory[p]))
        raw = memory[page][address - page : address - page + node.type.bits // 8]
        return node.type.read(int.from_bytes(raw, "little"))
    if isinstance(node, Cast):
        return node.type.read(int(_evaluate(node.operand, registers, memory)))
    if isinstance(node, Compare):
        left = _evaluate(node.left, registers, memory)
        right = _evaluate(node.right, registers, memory)
        return {
            "<": left < right, "<=": left <= right, ">": left > right,
            ">=": left >= right, "==": left == right, "!=": left != right,
        }[node.op]  # fmt: skip
    if isinstance(node, Truth):
        return _evaluate(node.operand, registers, memory) != 0
    if isinstance(node, Not):
        return not _evaluate(node.operand, registers, memory)
    if isinstance(node, And):
        return bool(_evaluate(node.left, registers, memory)) and bool(
            _evaluate(node.right, registers, memory)
        )
    return bool(_evaluate(node.left, registers, memory)) or bool(
        _evaluate(node.right, registers, memory)
    )


_SKIP = bytes.fromhex("488da42480ffffff")  # lea rsp,[rsp-0x80]: what the engine puts first
_UNSKIP = bytes.fromhex("488da42480000000")  # lea rsp,[rsp+0x80]


def _trampoline(source: str, at_entry: bool) -> bytes:
    """The body as the engine places it: stepping over the red zone unless at entry."""
    head = b"" if at_entry else _SKIP
    where = StackContext(step=0 if at_entry else RED_ZONE, return_slot=0 if at_entry else None)
    resolve = {"target": TARGET}.__getitem__
    body = assemble(source, CODE + len(head), resolve, where)
    return head + body + (b"" if at_entry else _UNSKIP)


def _run(code: bytes, registers: dict[str, int], data: bytes, stack: bytes):
    memory = {
        CODE: code + b"\x90" * 16,
        TARGET: b"\x90" * 16,
        RETURN_ADDRESS: b"\x90" * 16,
        DATA: data,
        STACK: stack,
    }
    watch = [(STACK, len(stack)), (DATA, len(data))]
    return run(memory, CODE, CODE + len(code), registers, watch), memory


@st.composite
def _machine(draw: st.DrawFn) -> tuple[dict[str, int], bytes, bytes]:
    registers = {name: draw(_values) for name in _GPRS}
    registers["rbx"] = RBX
    registers["rdi"] = draw(st.integers(0, 31))
    registers["rsp"] = SITE_RSP
    registers["rflags"] = 0x2 | (draw(st.integers(0, 0xFFF)) & ARITHMETIC)
    # Pages from a seed: drawing 12 KiB byte by byte makes hypothesis slow.
    rng = random.Random(draw(st.integers(0, 2**32)))
    data = rng.randbytes(PAGE)
    stack = bytearray(rng.randbytes(2 * PAGE))
    stack[PAGE : PAGE + 8] = RETURN_ADDRESS.to_bytes(8, "little")
    return registers, data, bytes(stack)


# GUARD_EXAMPLES=5000 for a longer run (about 2 minutes).
@settings(
    max_examples=int(os.environ.get("GUARD_EXAMPLES", "250")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data(), at_entry=st.booleans(), machine=_machine())
def test_guard_matches_python(
    data: st.DataObject, at_entry: bool, machine: tuple[dict[str, int], bytes, bytes]
) -> None:
    registers, data_page, stack = machine
    condition = data.draw(_conditions(at_entry))
    text = _text(condition)
    assert parse_when(text) == condition, text
    expected = bool(_evaluate(condition, registers, {DATA: data_page, STACK: stack}))

    code = _trampoline(
        guard_source(condition, parse_then("jump target"), at_entry=at_entry), at_entry
    )
    outcome, _ = _run(code, registers, data_page, stack)

    assert outcome.exit == (TARGET if expected else CODE + len(code)), text
    for name in [*_GPRS, "rsp"]:
        assert outcome.registers[name] == registers[name], (name, text)
    flags = ARITHMETIC | 0x400
    assert outcome.registers["rflags"] & flags == registers["rflags"] & flags, text
    # Nothing at or above the site's rsp changed, nor the red zone below it
    # away from an entry.
    spared = PAGE if at_entry else PAGE - 128
    assert outcome.memory[STACK][spared:] == stack[spared:], text
    assert outcome.memory[DATA] == data_page


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    machine=_machine(),
    value=st.none() | _literals,
    blocked=st.booleans(),
    threshold=st.integers(-(2**31), 2**31 - 1),
)
def test_return_at_entry(
    machine: tuple[dict[str, int], bytes, bytes], value: int | None, blocked: bool, threshold: int
) -> None:
    registers, data_page, stack = machine
    then = ("blocked; " if blocked else "") + ("return" if value is None else f"return {value}")
    source = guard_source(
        parse_when(f"esi > {threshold}"), parse_then(then), at_entry=True, counter=COUNTER
    )
    code = _trampoline(source, at_entry=True)
    outcome, _ = _run(code, registers, data_page, stack)
    holds = TYPES["i32"].read(registers["rsi"]) > threshold
    counted = int.from_bytes(outcome.memory[DATA][0x20:0x28], "little") - int.from_bytes(
        data_page[0x20:0x28], "little"
    )
    if not holds:
        assert outcome.exit == CODE + len(code)
        assert outcome.registers["rsp"] == SITE_RSP and counted == 0
        return
    assert outcome.exit == RETURN_ADDRESS
    assert outcome.registers["rsp"] == SITE_RSP + 8
    rax = registers["rax"] if value is None else value % 2**64
    assert outcome.registers["rax"] == rax
    for name in _GPRS:
        if name != "rax":
            assert outcome.registers[name] == registers[name], name
    assert counted % 2**64 == (1 if blocked else 0)


_GUARD_WORDS = st.sampled_from(
    ["rsi", "esi", "r15d", "rsp", "u32", "i8", "(", ")", "[", "]", "+", "-", "*", "<", "<=",
     "==", "!=", "!", "&&", "||", "0", "0x10", "64", "-1", "rdi", "(u64)", "4", "x", ";",
     "jump", "return", "blocked", "f+0x1", "goto"]
)  # fmt: skip


_printable = st.characters(exclude_categories=("Cc", "Cs"))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_GUARD_WORDS, max_size=12).map(" ".join) | st.text(_printable, max_size=30),
    st.lists(_GUARD_WORDS, max_size=4).map(" ".join) | st.text(_printable, max_size=20),
)
def test_random_guards_raise_only_patch_format_errors(when: str, then: str) -> None:
    source = (
        '[patch]\nid = "g"\nversion = 1\n[target]\nmodule = "m"\nbuild_id = "00"\n'
        f'[[patchlet]]\nat = "f"\nwhen = {json.dumps(when, ensure_ascii=False)}\n'
        f"then = {json.dumps(then, ensure_ascii=False)}\n"
    )
    try:
        patch = parse_patch(source)
    except PatchFormatError as exc:
        assert str(exc).startswith("<string>: ") and "patchlet[0]." in str(exc)
        return
    for at_entry in (True, False):
        # Only `return` away from an entry, and `blocked`, are refused here.
        with contextlib.suppress(GuardError):
            assemble(
                Toolchain().body_source(patch.patchlets[0], at_entry=at_entry),
                CODE,
                lambda _: TARGET,
            )
