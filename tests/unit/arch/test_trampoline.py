"""Trampoline layout, the site jump, and when the red zone must be stepped over."""

from __future__ import annotations

import pytest

from micropatch.arch.x86_64.constants import RED_ZONE
from micropatch.arch.x86_64.decode import decode, format_instruction
from micropatch.arch.x86_64.jumps import jump, site_jump
from micropatch.arch.x86_64.relocate import relocate
from micropatch.arch.x86_64.site import Site, site_unchecked
from micropatch.arch.x86_64.trampoline import build_trampoline, writes_stack
from micropatch.errors import SiteError

from .emulator import PAGE, asm, run

F = 0x1000_0000  # the patched function
T = 0x0F00_0000  # its trampoline, below it
STACK = 0x2000_0000
RSP = STACK + 0x800
# A leaf function keeping its argument in the red zone across the site.
FUNCTION = """
    mov qword ptr [rsp-8], rdi
    cmp rdi, 5
    mov rax, qword ptr [rsp-8]
    sete cl
    ret
"""
SITE_OFFSET = 9  # mov rax,[rsp-8]: exactly 5 bytes
STEP_OVER = f"lea rsp,[rsp-{RED_ZONE:#x}]"
STEP_BACK = f"lea rsp,[rsp+{RED_ZONE:#x}]"


def function_site() -> tuple[bytes, Site]:
    code = asm(FUNCTION, F)
    site = site_unchecked(code[SITE_OFFSET:], F + SITE_OFFSET)
    assert [format_instruction(i) for i in site.instructions] == ["mov rax,[rsp-8]"]
    return code, site


def text(code: bytes, address: int) -> list[str]:
    return [format_instruction(instruction) for instruction in decode(code, address)]


class Body:
    """A patchlet body that records where it was asked to be assembled."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.addresses: list[int] = []

    def __call__(self, address: int) -> bytes:
        self.addresses.append(address)
        return asm(self.source, address)


def test_site_jump_is_a_jump_padded_with_int3() -> None:
    site = site_unchecked(asm("push rbp; mov rbp, rsp; mov eax, 1", F), F)
    assert site.length == 9
    code = site_jump(site, T)
    assert code == jump(F, T) + b"\xcc" * 4
    assert text(code, F) == [f"jmp {T:#x}", "int3", "int3", "int3", "int3"]


def test_site_jump_needs_five_bytes() -> None:
    site = site_unchecked(asm("push rbp; ret", F), F, min_length=1)
    with pytest.raises(SiteError, match=f"site {F:#x} is 1 bytes long, too short"):
        site_jump(site, T)


def test_trampoline_runs_body_then_relocated_site_then_returns() -> None:
    _, site = function_site()
    body = Body("inc rbx")
    layout = build_trampoline(T, site, body, resume=None, skip_red_zone=False)
    assert body.addresses == [T]
    code = layout.code
    assert code == asm("inc rbx", T) + relocate(site.instructions, T + 3, return_to=site.end)
    # The layout says where each part is, so no caller re-derives it.
    assert layout.body == (T, T + 3)
    assert layout.copies[0] == layout.tail == T + 3
    assert len(layout.copies) == len(site.instructions) + 1
    assert layout.end == T + len(code)
    assert [layout.part(a) for a in (T, T + 3, layout.copies[-1])] == ["body", "displaced", "back"]


def test_trampoline_steps_over_the_red_zone_only_when_asked() -> None:
    _, site = function_site()
    body = Body("push rbx; pop rbx")
    layout = build_trampoline(T, site, body, resume=None, skip_red_zone=True)
    code = layout.code
    assert body.addresses == [T + 5]
    assert layout.body == (T + 5, T + 7)
    assert text(code, T) == [
        STEP_OVER,
        "push rbx",
        "pop rbx",
        STEP_BACK,
        "mov rax,[rsp-8]",
        f"jmp {site.end:#x}",
    ]
    plain = build_trampoline(
        T, site, Body("push rbx; pop rbx"), resume=None, skip_red_zone=False
    ).code
    assert STEP_OVER not in text(plain, T) and STEP_BACK not in text(plain, T)


def test_trampoline_with_resume_skips_the_displaced_instructions() -> None:
    _, site = function_site()
    resume = F + 0x100
    layout = build_trampoline(T, site, Body("xor eax, eax"), resume=resume, skip_red_zone=True)
    assert layout.copies == () and layout.tail == 0
    code = layout.code
    assert text(code, T) == [STEP_OVER, "xor eax,eax", STEP_BACK, f"jmp {resume:#x}"]


@pytest.mark.parametrize(
    ("skip_red_zone", "survives"), [(True, True), (False, False)], ids=["skipped", "clobbered"]
)
def test_red_zone_survives_a_pushing_patchlet_only_when_skipped(
    skip_red_zone: bool, survives: bool
) -> None:
    code, site = function_site()
    trampoline = build_trampoline(
        T, site, Body("push rbx; pop rbx"), resume=None, skip_red_zone=skip_red_zone
    ).code
    patched = code[:SITE_OFFSET] + site_jump(site, T) + code[site.end - F :]
    memory = {
        F: patched.ljust(PAGE, b"\xcc"),
        T: trampoline.ljust(PAGE, b"\xcc"),
        STACK: bytes(PAGE),
    }
    state = {"rsp": RSP, "rdi": 5, "rbx": 0xBAD, "rcx": 0}
    ret = F + len(code) - 1
    outcome = run(memory, F, ret, state, low=T)
    assert outcome.exit == ret
    assert outcome.registers["rax"] == (5 if survives else 0xBAD)
    assert outcome.registers["rcx"] == 1  # the flags of cmp survived the lea pair


@pytest.mark.parametrize(
    "source",
    [
        "push rax",
        "call 0x1000",
        "call qword ptr [rax]",
        "pushfq",
        "enter 16, 0",
        "leave",
        "sub rsp, 8",
        "and rsp, -16",
        "mov qword ptr [rsp-8], rax",
        "mov qword ptr [rsp+rcx*8], rax",
        "movaps xmmword ptr [rsp-32], xmm0",
        "nop; nop; push rbx",
        "mov rcx, rsp; mov qword ptr [rcx-8], rax",  # what the code does, not its text
        "lea rcx, [rsp+8]; mov qword ptr [rcx-0x10], rax",
        "mov rcx, rsp; mov qword ptr [rcx+rdx*8], rax",  # an index: any slot
        "jmp l; push rax; l: nop",  # unreachable here, but judged by its text
        # rsp copied at one of two offsets: a store through it at an unknown slot
        "mov rcx, rsp; test rdi, rdi; jz l; add rcx, 8; l: mov qword ptr [rcx-8], rax",
        "mov rcx, rsp; test rdi, rdi; jz l; add rcx, 8; l: mov rdx, rcx; mov [rdx-8], rax",
    ],
)
def test_writes_stack(source: str) -> None:
    assert writes_stack(asm(source, T), T)


@pytest.mark.parametrize(
    "source",
    [
        "mov rax, qword ptr [rsp+8]",
        "mov dword ptr [rsp+8], eax",  # the function's own frame, above rsp
        "mov qword ptr [rsp], rax",
        "lea rax, [rsp-8]",
        "mov rax, rsp",
        "mov qword ptr [rbp-8], rax",
        "add rax, rbx; cmp rax, 5; jne 0x1000",
        "mov rdi, qword ptr [rip+0x100]",
        "pop rax",
        "mov eax, -1; ret",
        "mov rcx, rsp; mov qword ptr [rcx+8], rax",  # above rsp, through a copy
        "mov rcx, rsp; mov rdx, rcx; mov rax, qword ptr [rdx+0x30]",
    ],
)
def test_does_not_write_stack(source: str) -> None:
    assert not writes_stack(asm(source, T), T)


def test_undecodable_body_counts_as_writing_the_stack() -> None:
    assert writes_stack(asm("nop", T) + b"\x06", T)
