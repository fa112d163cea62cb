"""`[frame+N]` rewriting and the stack rules (bodies.frame, arch.x86_64.stack):
the function's [rsp+N] whatever the body has pushed, checked by running the
assembled body in unicorn; what is refused, with its message."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from micropatch.arch.x86_64.constants import RED_ZONE
from micropatch.arch.x86_64.stack import trace
from micropatch.bodies.assemble import assemble
from micropatch.bodies.frame import StackContext
from micropatch.errors import AssemblyError, StackError

from ..arch.emulator import PAGE, asm, run

CODE = 0x100000
STACK = 0x500000  # two pages; the function's rsp at the site is the middle
SITE_RSP = STACK + PAGE
MID = StackContext(step=RED_ZONE, return_slot=0x28, cfa="rsp+0x30")
AT_RSP = StackContext(step=0, return_slot=0x28, cfa="rsp+0x30")  # a body that does not push


def _resolve(location: str) -> int:
    raise AssertionError(location)


def _execute(body: str, where: StackContext, stack: bytes) -> tuple[dict[str, int], bytes]:
    """The body as the engine places it (below the red zone by `where.step`)."""
    step = where.step
    head = asm(f"lea rsp, [rsp - {step:#x}]", CODE) if step else b""
    code = head + assemble(body, CODE + len(head), _resolve, where)
    code += asm(f"lea rsp, [rsp + {step:#x}]", CODE + len(code)) if step else b""
    registers = {"rsp": SITE_RSP, "rax": 0, "rbx": 0x1111, "rcx": 0, "rflags": 2}
    outcome = run(
        {CODE: code + b"\x90" * 16, STACK: stack}, CODE, CODE + len(code), registers,
        [(STACK, len(stack))],
    )  # fmt: skip
    assert outcome.exit == CODE + len(code)
    assert outcome.registers["rsp"] == SITE_RSP
    return outcome.registers, outcome.memory[STACK]


_MOVES = st.sampled_from(["push rbx", "push rcx", "sub rsp, 8", "sub rsp, 0x20", "pushfq"])


@settings(max_examples=60, deadline=None)
@given(
    moves=st.lists(_MOVES, max_size=8),
    slot=st.integers(0, 3),
    mid=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_frame_is_the_functions_rsp_whatever_was_pushed(moves, slot, mid, seed) -> None:
    """Straight-line pushes and `sub rsp` before a read and a write of [frame+N],
    undone after: the read sees the function's [rsp+N], the write lands there."""
    undo = {"push rbx": "pop rcx", "push rcx": "pop rcx", "pushfq": "popfq"}
    n = 8 * slot
    lines = [*moves, f"mov rax, qword ptr [frame+{n:#x}]", f"mov qword ptr [frame+{n + 8:#x}], rbx"]
    for move in reversed(moves):
        lines.append(undo.get(move) or move.replace("sub", "add"))
    stack = random.Random(seed).randbytes(2 * PAGE)
    registers, after = _execute("\n".join(lines), MID if mid else AT_RSP, stack)
    assert registers["rax"] == int.from_bytes(stack[PAGE + n : PAGE + n + 8], "little")
    assert after[PAGE + n + 8 : PAGE + n + 16] == (0x1111).to_bytes(8, "little")
    assert (
        after[PAGE:]
        == stack[PAGE : PAGE + n + 8] + after[PAGE + n + 8 : PAGE + n + 16] + stack[PAGE + n + 16 :]
    )


def test_lea_of_frame_and_a_store_through_it() -> None:
    stack = bytes(2 * PAGE)
    body = "push rax\nlea rax, [frame+0x10]\nmov qword ptr [rax], 7\npop rax"
    _, after = _execute(body, MID, stack)
    assert after[PAGE + 0x10 : PAGE + 0x18] == (7).to_bytes(8, "little")


def test_frame_after_a_call_and_a_branch_joining_equal_depths() -> None:
    body = "push rax\ntest rbx, rbx\njz a\nnop\na:\nmov rax, qword ptr [frame+8]\npop rax"
    assert assemble(body, CODE, _resolve, MID)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("push rax\njne a\npush rax\na:\nmov rax, [frame]", r"different depths"),
        ("push rax\nmov rsp, rbx\nmov rax, [frame]", r"not known from the entry rsp"),
        ("and rsp, -16\nmov rax, [frame]", r"not known from the entry rsp"),
        ("a:\npush rax\nmov rax, [frame]\njmp a", r"different depths"),
        ("push rax", r"the body ends .* with rsp 0x8 bytes below where it started"),
        ("push rax\npop rax\njmp 0x100", r"leaves the body with rsp 0x80 bytes below"),
        ("push rax\nmov [frame+0x28], rax\npop rax", r"at or above its return address"),
        ("push rax\nmov rax, [rsp+8]\npop rax", r"outside what the body has pushed"),
        ("push rcx\nmov rcx, rsp\nmov rdi, [rcx+0x30]\npop rcx", r"outside what the body"),
        ("push rax\nmov [rsp+rcx*8], rax\npop rax", r"at a stack depth not known|slot not known"),
        ("push rax\npop rax\nret", r"returns with rsp at the function's \[rsp-0x80\]"),
        (
            "push rcx\nmov rcx, rsp\njz a\nadd rcx, 8\na:\nmov rax, [rcx]\npop rcx",
            r"at a stack depth not known here",
        ),
    ],
)
def test_refused(body: str, message: str) -> None:
    with pytest.raises(StackError, match=message):
        assemble(body, CODE, _resolve, MID)


def test_store_above_the_return_address_at_rsp_without_pushing() -> None:
    with pytest.raises(StackError, match=r"\[rsp\+0x24\], at or above its return address"):
        assemble("mov qword ptr [rsp+0x24], rax", CODE, _resolve, StackContext(0, 0x28))
    assemble("mov qword ptr [rsp+0x20], rax", CODE, _resolve, StackContext(0, 0x28))


def test_frame_outside_a_memory_operand_is_refused() -> None:
    with pytest.raises(AssemblyError, match=r"`frame` stands for the function's rsp"):
        assemble("mov rax, frame", CODE, _resolve, MID)


def test_trace_follows_rsp_copies_and_depths() -> None:
    code = asm("push rax; mov rcx, rsp; sub rsp, 0x10; mov qword ptr [rcx+8], rdx; leave", CODE)
    found = trace(code, CODE)
    assert list(found.depths.values())[:4] == [0, 8, 8, 0x18]
    [access] = found.accesses
    assert (access.anchor, access.offset, access.write) == ("rsp", 0, True)
    assert found.pushes_below and not found.hidden_entries


def test_trace_notes_calls_into_the_body() -> None:
    code = asm("call f; ret; f: ret", CODE)
    assert trace(code, CODE).hidden_entries


def test_store_at_the_return_address_through_rbp() -> None:
    """A function with a frame pointer: CFA = rbp+0x10, its return address at [rbp+8]."""
    where = StackContext(step=0, rbp_return_slot=8, cfa="rbp+0x10")
    with pytest.raises(
        StackError, match=r"\[rbp\+0x8\], at or above its return address at \[rbp\+0x8\]"
    ):
        assemble("mov qword ptr [rbp+8], rax", CODE, _resolve, where)
    assemble("mov qword ptr [rbp-8], rax", CODE, _resolve, where)
