"""diff when most functions changed (tools/diff/churn.py): the outline of a
function on small assembled instruction sequences, the order it gives, and on
real builds of diffpair.c at two optimisation levels (a compiler change)."""

from __future__ import annotations

import pytest
from keystone import KS_ARCH_X86, KS_MODE_64, Ks
from typer.testing import CliRunner

from micropatch.cli.main import app
from micropatch.tools.analysis import ModuleAnalysis
from micropatch.tools.diff.churn import Outline, by_outline, churned, outline
from micropatch.tools.diff.match import diff_modules
from micropatch.tools.diff.rank import Change
from micropatch.tools.functions import Function
from micropatch.tools.insn import decode

from .conftest import Build

ADDRESS = 0x1000
NAMES = {0x2000: "memcpy", 0x3000: "ImagingError", 0x4000: "memset@plt"}
CHECK = "mov eax, [rdi + 8]; cmp eax, 6; jl bail; add eax, 3; ret; bail: mov eax, -1; ret"


def _outline(text: str) -> Outline:
    encoding, _ = Ks(KS_ARCH_X86, KS_MODE_64).asm(text, ADDRESS)
    return outline(list(decode(bytes(encoding or []), ADDRESS)), NAMES.get)


def test_a_compilers_choices_leave_the_outline_as_it_was() -> None:
    old = _outline(CHECK)
    assert old.features == {("compared", 6)} and old.exits == 1
    compiled = _outline(
        "sub rsp, 0x158; mov edx, 0x66666667; mov ebx, [rdi + 8]; imul edx; "
        "cmp ebx, 6; jge go; mov eax, -1; jmp out; go: lea eax, [rbx + 3]; "
        "call 0x2000; call 0x4000; out: add rsp, 0x158; ret"
    )  # another frame, a division by 10, memcpy and memset called, blocks laid out otherwise
    assert compiled == old


def test_the_programs_constants_bounds_and_calls_are_gained() -> None:
    old = _outline(CHECK)
    bound = _outline(CHECK.replace("cmp eax, 6", "cmp eax, 8"))
    assert bound.features - old.features == {("compared", 8)}
    limit = _outline("mov ecx, 0x7fffffff; " + CHECK)
    assert limit.features - old.features == {("constant", 0x7FFFFFFF)}
    small = _outline("add ecx, 0x20; " + CHECK)
    assert small.features == old.features  # a small constant is a compiler's as often
    called = _outline(CHECK.replace("bail: ", "bail: call 0x3000; "))
    assert called.features - old.features == {("call", "ImagingError")}
    # A negative constant is the same however it is encoded.
    for text in ("and eax, -1024", "mov rax, -1024", "mov eax, 0xfffffc00", "movabs rax, -1024"):
        assert _outline(text + "; ret").features == {("constant", -1024)}, text


def test_a_branch_leads_to_a_return_straight_or_through_a_jump() -> None:
    assert _outline(CHECK).exits == 1
    through = _outline("test esi, esi; je bail; ret; bail: xor eax, eax; jmp out; nop; out: ret")
    assert through.exits == 1
    tested = _outline("test esi, esi; je more; ret; more: cmp edx, 1; je done; ret; done: ret")
    assert tested.exits == 1  # `je more` reaches another test first; `je done` a return
    epilogue = "add rsp, 0x48; pop rbx; pop rbp; pop r12; pop r13; pop r14; pop r15; ret"
    error = "mov dword ptr [r12 + 8], -1; mov eax, -1; "
    assert _outline(f"test esi, esi; jl bail; ret; bail: {error}{epilogue}").exits == 1
    work = "add eax, 1; add eax, 2; add eax, 3; add eax, 4; add eax, 5; "
    assert _outline(f"test esi, esi; jl more; ret; more: {work}{epilogue}").exits == 0


def _change(start: int) -> Change:
    function = Function(start, start + 0x40, None, (), "symbol")
    return Change(function, function, "name", 0.5, 10, 10, "logic", 0)


def _pair(exits: tuple[int, int], *gained: tuple[str, int | str]) -> tuple[Outline, Outline]:
    common = frozenset({("compared", 0)})
    return Outline(common, exits[0]), Outline(common | set(gained), exits[1])


def test_order_an_early_return_first_then_the_rarest_gain() -> None:
    changes = [_change(0x1000 * n) for n in range(1, 6)]
    churn = _pair((1, 1), ("compared", 8))
    same = _pair((1, 1), ("compared", 8))
    rare = _pair((1, 1), ("constant", 0x7FFFFFFF))
    bail = _pair((1, 2), ("compared", 8))
    quiet = _pair((3, 3))
    ranked = by_outline(changes, [churn, quiet, same, rare, bail])
    # bail gained a branch to a return; rare's gain is in no other change; the two
    # that gained the same comparison and the one that gained nothing keep their order.
    assert ranked == [changes[4], changes[3], changes[0], changes[2], changes[1]]


def test_churned_when_most_matched_functions_changed() -> None:
    assert churned(476, 547) and churned(9, 11)
    assert not churned(87, 4540) and not churned(3, 6) and not churned(0, 0)


@pytest.mark.parametrize(("old_level", "new_level"), [("O0", "O2"), ("O2", "O0")])
def test_another_compiler_the_fix_still_ranks_in_the_top_two(
    diff_pairs: dict[str, tuple[Build, Build]], old_level: str, new_level: str
) -> None:
    # Unstripped: across optimisation levels the matcher needs the names. Without
    # the outline order the fix ranks third both ways.
    old, new = diff_pairs[old_level][0], diff_pairs[new_level][1]
    result = diff_modules(ModuleAnalysis.open(old.symbols), ModuleAnalysis.open(new.symbols))
    assert result.churned
    names = [change.name for change in result.changes]
    assert "parse_name" in names[:2], names
    runner = CliRunner()
    shown = runner.invoke(app, ["diff", str(old.symbols), str(new.symbols)])
    assert shown.exit_code == 0 and "matched functions changed (another compiler" in shown.stdout
    same_level = runner.invoke(
        app, ["diff", str(old.symbols), str(diff_pairs[old_level][1].symbols)]
    )
    assert same_level.exit_code == 0 and "note:" not in same_level.stdout
