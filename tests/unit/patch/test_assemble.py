from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from iced_x86 import Code, Decoder, Instruction, Mnemonic
from keystone import KS_ARCH_X86, KS_MODE_64, Ks

from micropatch.bodies.assemble import assemble, check
from micropatch.errors import AssemblyError, SymbolNotFound
from micropatch.patch.asmtext import references

MODULE = 0x7F12_3400_0000
CAVE = 0x7F12_3456_0000
SYMBOLS = {"parse_packet": 0x1150, "parse_packet_error": 0x11A0, "g_limit": 0x4018, "log": 0x1300}


def resolve(location: str) -> int:
    symbol, _, addend = location.partition("+")
    return MODULE + SYMBOLS[symbol.strip()] + (int(addend, 0) if addend else 0)


def decode(machine: bytes, address: int) -> list[Instruction]:
    instructions = list(Decoder(64, machine, ip=address))
    assert all(i.code != Code.INVALID for i in instructions)
    return instructions


def test_references_in_order_without_duplicates_or_comments() -> None:
    code = """
        cmp edx, 64            # {not_a_reference}
        ja {parse_packet_error}
        mov eax, dword ptr [rip + { g_limit+0x4 }]
        jmp {parse_packet_error}
        vaddps zmm0 {{k1}}{{z}}, zmm1, zmm2
    """
    assert references(code) == ["parse_packet_error", "g_limit+0x4"]
    assert references("") == []


@pytest.mark.parametrize("code", ["jmp {log", "jmp log}", "jmp {a{b}}"])
def test_unmatched_braces(code: str) -> None:
    with pytest.raises(AssemblyError, match=r"line 1 .*unmatched"):
        references(code)


def test_references_become_correct_relative_operands() -> None:
    code = """
        cmp edx, 64
        ja {parse_packet_error}
        cmp dword ptr [rip + {g_limit}], 0
        lea rdi, [rip + {g_limit+4}]
        mov r11, {log}
        call {log}
        jne done
        jmp {parse_packet+0x12}
    done:
        ret
    """
    for address in (CAVE, MODULE - 0x7000_0000):  # after and before the module
        instructions = decode(assemble(code, address, resolve), address)
        assert [i.mnemonic for i in instructions] == [
            Mnemonic.CMP,
            Mnemonic.JA,
            Mnemonic.CMP,
            Mnemonic.LEA,
            Mnemonic.MOV,
            Mnemonic.CALL,
            Mnemonic.JNE,
            Mnemonic.JMP,
            Mnemonic.RET,
        ]
        cmp, ja, cmp_mem, lea, mov, call, jne, jmp, ret = instructions
        assert cmp.immediate(1) == 64  # decimal stays decimal
        assert ja.near_branch_target == MODULE + 0x11A0
        assert cmp_mem.is_ip_rel_memory_operand
        assert cmp_mem.ip_rel_memory_address == MODULE + 0x4018
        assert lea.ip_rel_memory_address == MODULE + 0x401C
        assert mov.immediate(1) == MODULE + 0x1300
        assert call.near_branch_target == MODULE + 0x1300
        assert jne.near_branch_target == ret.ip
        assert jmp.near_branch_target == MODULE + 0x1162


def test_empty_code() -> None:
    def never(location: str) -> int:
        raise AssertionError(location)

    for code in ("", "   \n\t\n", "# just a comment\n  # {and a reference}\n"):
        assert assemble(code, CAVE, never) == b""


def test_semicolon_separates_statements() -> None:
    machine = assemble("xor eax, eax; inc eax  # two statements", CAVE, resolve)
    assert [i.mnemonic for i in decode(machine, CAVE)] == [Mnemonic.XOR, Mnemonic.INC]


def test_literal_braces_for_avx512_masks() -> None:
    machine = assemble("vaddps zmm0 {{k1}}{{z}}, zmm1, zmm2", CAVE, resolve)
    expected, _ = Ks(KS_ARCH_X86, KS_MODE_64).asm("vaddps zmm0 {k1}{z}, zmm1, zmm2", CAVE)
    assert machine == bytes(expected)


def test_resolve_errors_propagate() -> None:
    def missing(location: str) -> int:
        raise SymbolNotFound(f"no symbol {location!r}")

    with pytest.raises(SymbolNotFound, match="'nowhere'"):
        assemble("jmp {nowhere}", CAVE, missing)


def test_branch_out_of_reach_is_refused_not_truncated() -> None:
    # Keystone encodes this jump as `jmp $` (rel32 wrapped) without complaint.
    with pytest.raises(AssemblyError, match=r"line 1 \('jmp \{far\}'\)"):
        assemble("jmp {far}", 0x1000, lambda _: 0x1_0000_1000)


def test_truncated_immediate_is_refused() -> None:
    with pytest.raises(
        AssemblyError, match=r"line 3 .*\{log\} \(0x7f1234001300\) does not fit .*truncated"
    ):
        assemble("call {log}\nnop\nmov ecx, {log}", CAVE, resolve)
    # A non-PIE executable's addresses fit in 32 bits: then it is correct.
    machine = assemble("mov ecx, {x}", 0x10000000, lambda _: 0x401000)
    assert decode(machine, 0x10000000)[0].immediate(1) == 0x401000


def test_rip_relative_out_of_reach() -> None:
    with pytest.raises(AssemblyError, match=r"line 2 .*beyond the \+-2 GiB reach"):
        assemble("nop\nmov eax, [rip + {far}]", CAVE, lambda _: CAVE + (3 << 30))


def test_rip_relative_offset_belongs_in_braces() -> None:
    with pytest.raises(AssemblyError, match=r"\[rip \+ \{symbol\+0xN\}\]"):
        assemble("mov eax, [rip + {g_limit} + 4]", CAVE, resolve)


@pytest.mark.parametrize(
    ("code", "message"),
    [
        ("nop\nfoo eax\nnop", r"line 2 \('foo eax'\): invalid mnemonic"),
        ("nop\nmov eax, [", r"line 2 \('mov eax, \['\): statement ends too early"),
        ("jne done\nret", r"line 1 \('jne done'\): unknown symbol 'done'.*\{done\}"),
        ("  mov eax, 1 + %", r"line 1 \('mov eax, 1 \+ %'\): unexpected character '%'"),
        ("mov eax, [rbx + 010]", r"line 1 .*010 has a leading zero, which keystone reads as octal"),
        ("nop\n.align 16", r"line 2 .*directive \.align is not supported"),
        ("mov eax, 'é'", r"line 1 .*non-ASCII"),
        ("mov eax, ebx, ecx, edx, esi", r"line 1 .*invalid"),
    ],
)
def test_errors_name_the_line(code: str, message: str) -> None:
    with pytest.raises(AssemblyError, match=message):
        assemble(code, CAVE, resolve)


def test_keystone_hangs_are_refused_before_keystone() -> None:
    """Keystone 0.9.2 loops forever on these; run in a child so a regression
    fails the test instead of hanging the suite."""
    inputs = [
        "[",
        "label: %",
        ".byte |",
        "nop ; [",
        "lock + x",
        ".equ +",
        "ja : ! ptr",
        '.ascii "x',
        "mov eax, 1 ; )",
        ",",
    ]
    script = textwrap.dedent(
        f"""
        from micropatch.errors import AssemblyError
        from micropatch.bodies.assemble import assemble
        for code in {inputs!r}:
            try:
                assemble(code, 0x1000, lambda _: 0)
            except AssemblyError:
                continue
            raise SystemExit(f"accepted: {{code!r}}")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_check() -> None:
    check("cmp edx, 64\nja {parse_packet_error}\nmov eax, [rip + {g_limit}]")
    with pytest.raises(AssemblyError, match="invalid mnemonic"):
        check("cmpx edx, 64")


TEMPLATES = [
    ("jmp {t}", lambda i: i.near_branch_target),
    ("call {t}", lambda i: i.near_branch_target),
    ("jae {t}", lambda i: i.near_branch_target),
    ("mov eax, dword ptr [rip + {t}]", lambda i: i.ip_rel_memory_address),
    ("mov rax, {t}", lambda i: i.immediate(1)),
]


@settings(max_examples=400, deadline=None)
@given(
    template=st.sampled_from(TEMPLATES),
    address=st.integers(0, (1 << 64) - 64),
    delta=st.integers(-(1 << 33), 1 << 33) | st.integers(-(1 << 64), 1 << 64),
)
def test_references_arrive_exactly_or_not_at_all(
    template: tuple[str, object], address: int, delta: int
) -> None:
    """Whatever the distance, a reference is encoded exactly or refused."""
    code, operand = template
    target = (address + delta) % (1 << 64)
    try:
        machine = assemble(code, address, lambda _: target)
    except AssemblyError:
        return
    (instruction,) = decode(machine, address)
    assert operand(instruction) == target  # type: ignore[operator]


def test_decimal_numbers_stay_decimal() -> None:
    """Regression: keystone reads decimals as hex when a symbol resolver is set."""
    code = assemble("cmp edx, 16\njbe ok\nmov eax, -1\nret\nok:", 0x1000, lambda _r: 0)
    assert code[:3] == bytes([0x83, 0xFA, 16])
