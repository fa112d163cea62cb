"""Planning sites: whole instructions, and nothing in the function reaching inside."""

from __future__ import annotations

import re

import pytest

from micropatch.arch.x86_64.decode import format_instruction
from micropatch.arch.x86_64.site import Site, plan_site, site_unchecked
from micropatch.errors import BranchIntoSite, NotInstructionBoundary, SiteError

from .emulator import asm

F = 0x401000
# 0x401000 push rbp          0x401009 test eax,eax
# 0x401001 mov rbp,rsp       0x40100b jne 0x401006
# 0x401004 mov eax,[rdi]     0x40100d pop rbp
# 0x401006 add eax,1         0x40100e ret
FUNCTION = """
    push rbp
    mov rbp, rsp
    mov eax, dword ptr [rdi]
again:
    add eax, 1
    test eax, eax
    jne again
    pop rbp
    ret
"""
CODE = asm(FUNCTION, F)
WHERE = f"function {F:#x}-{F + len(CODE):#x}"


def texts(site: Site) -> list[str]:
    return [format_instruction(instruction) for instruction in site.instructions]


def test_site_takes_whole_instructions_until_long_enough() -> None:
    site = plan_site(CODE, F, F)
    assert texts(site) == ["push rbp", "mov rbp,rsp", "mov eax,[rdi]"]
    assert (site.address, site.length, site.end) == (F, 6, F + 6)
    assert site.original == CODE[:6]


def test_min_length_is_honoured() -> None:
    assert texts(plan_site(CODE, F, F, min_length=1)) == ["push rbp"]
    assert plan_site(CODE, F, F + 6, min_length=6).end == F + 0xD


def test_site_inside_an_instruction_is_refused_with_the_nearest_boundaries() -> None:
    message = (
        f"site 0x401002 is inside the instruction at 0x401001 (mov rbp,rsp) in the {WHERE}; "
        "nearest boundaries: 0x401001, 0x401004"
    )
    with pytest.raises(NotInstructionBoundary, match=re.escape(message)):
        plan_site(CODE, F, F + 2)


def test_branch_into_the_site_is_refused_naming_the_branch() -> None:
    # The site 0x401004-0x401009 covers "again", the target of the jne.
    message = (
        f"jne 0x401006 at 0x40100b in the {WHERE} branches to 0x401006, inside site "
        "0x401004-0x401009: the patch jump would overwrite its target; choose a site that "
        "starts at 0x401006 or ends before it"
    )
    with pytest.raises(BranchIntoSite, match=re.escape(message)):
        plan_site(CODE, F, F + 4)


def test_branch_to_the_site_start_is_allowed() -> None:
    site = plan_site(CODE, F, F + 6)
    assert texts(site) == ["add eax,1", "test eax,eax"]


def test_call_before_the_last_displaced_instruction_is_refused() -> None:
    code = asm("call rax; mov ebx, eax; nop; ret", F)
    message = (
        "site 0x401000-0x401005 displaces the call at 0x401000 (call rax) before its last "
        "instruction: the call would return to 0x401002, inside the overwritten bytes"
    )
    with pytest.raises(SiteError, match=re.escape(message)):
        plan_site(code, F, F)


def test_call_as_the_last_displaced_instruction_is_allowed() -> None:
    code = asm("push rbx; call 0x402000; mov ebx, eax; pop rbx; ret", F)
    assert texts(plan_site(code, F, F)) == ["push rbx", "call 0x402000"]


def test_traps_and_syscall_may_be_displaced() -> None:
    code = asm("syscall; int3; ud2; ret", F)
    assert texts(plan_site(code, F, F)) == ["syscall", "int3", "ud2"]


def test_site_running_past_the_function_end_is_refused() -> None:
    message = (
        f"site 0x40100d needs 5 bytes of whole instructions but only 2 remain before the "
        f"end of the {WHERE}; choose an earlier site"
    )
    with pytest.raises(SiteError, match=re.escape(message)):
        plan_site(CODE, F, F + 0xD)


def test_site_outside_the_function_is_refused() -> None:
    with pytest.raises(SiteError, match=re.escape(f"site 0x402000 is outside the {WHERE}")):
        plan_site(CODE, F, 0x402000)


def test_undecodable_function_is_refused_with_the_address() -> None:
    code = CODE + b"\x06"  # push es: invalid in 64-bit mode
    with pytest.raises(SiteError, match=r"does not decode at 0x40100f .*mark it unchecked"):
        plan_site(code, F, F)


def test_rip_relative_address_inside_the_site_is_refused() -> None:
    # lea at 0x401000 (7 bytes) computes 0x40100a, inside the site 0x401007-0x40100d.
    code = asm("lea rcx, [rip+3]; nop; mov eax, 1; ret", F)
    with pytest.raises(
        BranchIntoSite, match=re.escape("lea rcx,[rip+3] at 0x401000 in the function")
    ):
        plan_site(code, F, F + 7)


def test_rip_relative_address_of_the_site_start_is_allowed() -> None:
    code = asm("lea rcx, [rip]; nop; mov eax, 1; ret", F)
    assert plan_site(code, F, F + 7).address == F + 7


def test_rip_relative_read_of_the_site_start_is_refused() -> None:
    # Reading the first byte would see the patch jump's opcode.
    code = asm("mov al, byte ptr [rip]; nop; mov eax, 1; ret", F)
    with pytest.raises(BranchIntoSite, match=r"refers to 0x401006, inside site 0x401006"):
        plan_site(code, F, F + 6)


def test_unchecked_site_starts_at_the_code_given() -> None:
    site = site_unchecked(CODE[4:], F + 4)
    assert texts(site) == ["mov eax,[rdi]", "add eax,1"]
    assert site.original == CODE[4:9]


def test_unchecked_site_still_needs_enough_whole_instructions() -> None:
    with pytest.raises(SiteError, match="only 3 remain before the end of the 3 bytes given"):
        site_unchecked(CODE[:4][1:], F + 1, min_length=5)


def test_unchecked_site_refuses_a_truncated_instruction() -> None:
    with pytest.raises(SiteError, match="invalid or truncated instruction at 0x401004"):
        site_unchecked(CODE[:5], F)


def test_unchecked_site_still_refuses_a_call_before_the_end() -> None:
    with pytest.raises(SiteError, match="displaces the call at 0x401000"):
        site_unchecked(asm("call rax; mov ebx, eax; nop", F), F)
