"""Relocation of specific displaced instructions, by shape and in the emulator."""

from __future__ import annotations

import pytest
from iced_x86 import Code, Instruction

from micropatch.arch.x86_64.decode import decode, format_instruction
from micropatch.arch.x86_64.jumps import jump
from micropatch.arch.x86_64.relocate import relocate
from micropatch.errors import RelocationError

from .emulator import PAGE, Outcome, asm, run

A = 0x1000_0000  # where the original instructions are
B = 0x3000_0000  # where they are relocated to: 512 MiB away, within reach
TARGET = A + 0x40  # a branch target outside every site below
STACK = 0x2000_0000
RSP = STACK + 0x800


def relocated(source: str, new_address: int = B) -> tuple[list[Instruction], int]:
    """Relocate ``source`` assembled at A to ``new_address``; also return its site end."""
    displaced = decode(asm(source, A), A)
    site_end = displaced[-1].next_ip
    return decode(relocate(displaced, new_address, return_to=site_end), new_address), site_end


def text(instructions: list[Instruction]) -> list[str]:
    return [format_instruction(instruction) for instruction in instructions]


def emulate(source: str, **registers: int) -> Outcome:
    """Run the original at A and the copy at B until each leaves; they must agree."""
    original = asm(source, A)
    code = relocate(decode(original, A), B, return_to=A + len(original))
    memory = {
        A: original.ljust(PAGE, b"\xcc"),
        B: code.ljust(PAGE, b"\xcc"),
        STACK: TARGET.to_bytes(8, "little") * (PAGE // 8),  # for ret or call [rsp+d]
    }
    state = {"rsp": RSP, **registers}
    watch = [(STACK, 0x1000)]
    expected = run(memory, A, A + len(original), state, watch)
    actual = run(memory, B, B + len(code), state, watch)
    assert actual == expected
    return expected


def test_jump_encodes_rel32() -> None:
    assert jump(0x1000, 0x2000) == b"\xe9" + (0x2000 - 0x1005).to_bytes(4, "little")
    assert jump(0x2000, 0x1000) == b"\xe9" + (0x1000 - 0x2005).to_bytes(4, "little", signed=True)


def test_jump_out_of_reach_is_refused() -> None:
    with pytest.raises(RelocationError, match=r"from 0x1000 to 0x80001005: .*2 GiB"):
        jump(0x1000, 0x8000_1005)


def test_rip_relative_load_and_lea_keep_their_target() -> None:
    code, end = relocated("mov rax, qword ptr [rip+0x1234]; lea rcx, [rip-0x10]")
    assert code[0].ip_rel_memory_address == A + 7 + 0x1234
    assert code[1].ip_rel_memory_address == A + 14 - 0x10
    assert text(code) == [
        f"mov rax,[rip-{B + 7 - (A + 7 + 0x1234):#x}]",
        f"lea rcx,[rip-{B + 14 - (A + 14 - 0x10):#x}]",
        f"jmp {end:#x}",
    ]
    emulate("mov rax, qword ptr [rip+0x10]; lea rcx, [rip-0x10]")


def test_short_jcc_becomes_near() -> None:
    code, end = relocated(f"jne {TARGET:#x}")
    assert code[0].code == Code.JNE_REL32_64
    assert text(code) == [f"jne {TARGET:#x}", f"jmp {end:#x}"]


@pytest.mark.parametrize("branch", ["jrcxz", "jecxz", "loop", "loope", "loopne"])
def test_rcx_branches_go_through_a_near_jump(branch: str) -> None:
    # They have no near form: "branch +2; jmp short over; jmp near target".
    code, end = relocated(f"{branch} {TARGET:#x}")
    assert code[0].mnemonic == decode(asm(f"{branch} {TARGET:#x}", A), A)[0].mnemonic
    assert code[0].near_branch_target == code[2].ip
    assert code[1].near_branch_target == code[3].ip
    assert text(code[2:]) == [f"jmp {TARGET:#x}", f"jmp {end:#x}"]


@pytest.mark.parametrize("rcx", [0, 1, 2, 2**32])
@pytest.mark.parametrize("branch", ["jrcxz", "jecxz", "loop", "loope", "loopne"])
@pytest.mark.parametrize("rflags", [0x2, 0x42], ids=["nz", "zf"])
def test_rcx_branches_behave_as_before(branch: str, rcx: int, rflags: int) -> None:
    emulate(f"{branch} {TARGET:#x}", rcx=rcx, rflags=rflags)


def test_call_pushes_the_original_return_address() -> None:
    callee = A + 0x400
    code, end = relocated(f"nop; call {callee:#x}")
    assert text(code) == [
        "nop",
        "push rax",
        f"mov rax,{end:#x}",
        "xchg [rsp],rax",
        f"jmp {callee:#x}",
        f"jmp {end:#x}",
    ]
    outcome = emulate(f"nop; call {callee:#x}", rax=0x1234)
    assert outcome.exit == callee
    assert outcome.registers["rax"] == 0x1234
    assert outcome.registers["rsp"] == RSP - 8
    assert outcome.memory[STACK][RSP - 8 - STACK : RSP - STACK] == end.to_bytes(8, "little")


def test_call_through_rip_relative_memory() -> None:
    code, end = relocated("call qword ptr [rip+0x100]")
    assert text(code[:3]) == ["push rax", f"mov rax,{end:#x}", "xchg [rsp],rax"]
    assert code[3].code == Code.JMP_RM64
    assert code[3].ip_rel_memory_address == A + 6 + 0x100


def test_call_through_the_stack_accounts_for_the_pushed_address() -> None:
    code, _ = relocated("call qword ptr [rsp+0x7c]")
    assert format_instruction(code[3]) == "jmp qword ptr [rsp+0x84]"
    outcome = emulate("push rax; call qword ptr [rsp+8]", rax=A + 0x80)
    assert outcome.exit == TARGET


def test_call_through_a_register() -> None:
    code, end = relocated("call rax")
    assert text(code[1:]) == [f"mov rax,{end:#x}", "xchg [rsp],rax", "jmp rax", f"jmp {end:#x}"]


def test_call_far_from_the_cave_jumps_through_an_absolute_address() -> None:
    # The callee is 1.75 GiB below the site and the cave 1.75 GiB above it.
    site = 0x1_0000_0000
    callee, cave = site - 0x7000_0000, site + 0x7000_0000
    code = relocate(decode(asm(f"call {callee:#x}", site), site), cave, return_to=site + 5)
    jmp = decode(code, cave)[3]
    assert format_instruction(jmp) == "jmp qword ptr [rip]"
    assert code[jmp.next_ip - cave :][:8] == callee.to_bytes(8, "little")
    memory = {
        callee: b"\xcc" * PAGE,
        cave: code.ljust(PAGE, b"\xcc"),
        STACK: bytes(PAGE),
    }
    outcome = run(memory, cave, jmp.next_ip, {"rsp": RSP}, [(RSP - 8, 8)])
    assert outcome.exit == callee
    assert outcome.memory[RSP - 8] == (site + 5).to_bytes(8, "little")


def test_call_through_rsp_is_refused() -> None:
    with pytest.raises(RelocationError, match=rf"call rsp at {A:#x}: its target depends on rsp"):
        relocated("call rsp")


def test_rip_relative_operand_out_of_reach_is_refused() -> None:
    far = A + 0x9000_0000
    with pytest.raises(
        RelocationError,
        match=(
            rf"mov rax,\[rip\+0x1234\] from {A:#x} to {far:#x}: "
            rf"it refers to {A + 7 + 0x1234:#x}, more than 2 GiB away"
        ),
    ):
        relocated("mov rax, qword ptr [rip+0x1234]", far)


def test_branch_out_of_reach_is_refused() -> None:
    with pytest.raises(RelocationError, match=rf"jne {TARGET:#x} from {A:#x}"):
        relocated(f"jne {TARGET:#x}", A + 0x8000_0100)


def test_branch_to_the_site_start_goes_back_through_the_site() -> None:
    # After patching, the site's first byte is the patch jump: a branch there
    # must take it again, not loop inside the trampoline's copy.
    code, end = relocated(f"jmp {A:#x}; nop")
    assert text(code) == [f"jmp {A:#x}", "nop", f"jmp {end:#x}"]
    code, _ = relocated(f"nop; jne {A:#x}")
    assert text(code)[1] == f"jne {A:#x}"


def test_jump_back_is_appended_after_a_final_ret() -> None:
    code, end = relocated("ret")
    assert text(code) == ["ret", f"jmp {end:#x}"]


def test_syscall_is_moved_as_it_is() -> None:
    # iced classes syscall's flow control as a call; it must not be rewritten as one.
    code, end = relocated("syscall; nop; nop; nop")
    assert text(code) == ["syscall", "nop", "nop", "nop", f"jmp {end:#x}"]


def test_far_call_is_refused() -> None:
    displaced = decode(bytes.fromhex("ff18"), A)  # call far [rax]
    with pytest.raises(RelocationError, match="only near 64-bit calls can be relocated"):
        relocate(displaced, B, return_to=A + 2)


def test_relocated_addresses_map_each_instruction() -> None:
    from micropatch.arch.x86_64.decode import decode
    from micropatch.arch.x86_64.relocate import relocate, relocated_addresses

    original = 0x401000
    ks_code = bytes.fromhex("85ff74048d04bf")  # test edi,edi; je +4; lea eax,[rdi+rdi*4]
    instructions = decode(ks_code, original)
    new = 0x500000
    starts = relocated_addresses(instructions, new)
    assert len(starts) == len(instructions) + 1
    code = relocate(instructions, new, return_to=original + len(ks_code))
    copies = decode(code, new)
    assert [c.ip for c in copies[: len(instructions)]] == starts[:-1]
    assert starts[-1] == new + len(code) - 5  # the jump back
    assert copies[1].near_branch_target == instructions[1].near_branch_target
