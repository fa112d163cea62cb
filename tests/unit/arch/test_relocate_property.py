"""Relocated code must behave exactly like the original, checked in an emulator.

Hypothesis draws a run of displaced instructions (arithmetic, RIP-relative
loads, stores and address computations, short jcc/jrcxz/loop out of the site,
push/pop, and a final call, jmp or ret) and a machine state. The original runs
at SITE, the relocated copy somewhere else within 2 GiB; both must leave their
code for the same original address with the same registers, flags, data and
stack (including any pushed return address).
"""

from __future__ import annotations

import random

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from iced_x86 import Code, Encoder, Instruction, MemoryOperand, Register

from micropatch.arch.x86_64.decode import decode
from micropatch.arch.x86_64.relocate import relocate

from .emulator import PAGE, REGISTERS, Outcome, run

CODE = 0x1000_0000  # two pages of int3 holding the original site
SITE = CODE + 0x800
DATA = 0x1001_0000  # random bytes that loads read and stores write
POINTERS = 0x1001_1000  # landing-pad addresses for call [rip+d]; never written
STACK = 0x2000_0000  # landing-pad addresses, so ret and call [rsp+d] land on code
STACK_SIZE = 0x2000
RSP = STACK + STACK_SIZE // 2

# Landing pads: code addresses outside the site where a branch may leave it.
# Short branch targets stay within rel8 reach of any instruction of a site
# shorter than FORWARD - SITE bytes.
FORWARD = SITE + 0x50
PADS = [CODE + 0x10 * k for k in range(0x40)]

GPRS = [
    Register.RAX, Register.RCX, Register.RDX, Register.RBX, Register.RBP, Register.RSI,
    Register.RDI, Register.R8, Register.R9, Register.R10, Register.R11, Register.R12,
    Register.R13, Register.R14, Register.R15,
]  # fmt: skip
GPR_NAMES = [name for name in REGISTERS if name not in ("rsp", "rflags")]
CONDITIONS = [
    "O", "NO", "B", "AE", "E", "NE", "BE", "A", "S", "NS", "P", "NP", "L", "GE", "LE", "G",
]  # fmt: skip
SHORT_BRANCHES = [getattr(Code, f"J{condition}_REL8_64") for condition in CONDITIONS] + [
    Code.JRCXZ_REL8_64,
    Code.JECXZ_REL8_64,
    Code.LOOP_REL8_64_RCX,
    Code.LOOP_REL8_64_ECX,
    Code.LOOPE_REL8_64_RCX,
    Code.LOOPNE_REL8_64_RCX,
]
REG_REG = [
    Code.ADD_RM64_R64, Code.SUB_RM64_R64, Code.ADC_RM64_R64, Code.SBB_RM64_R64,
    Code.AND_RM64_R64, Code.OR_RM64_R64, Code.XOR_RM64_R64, Code.CMP_RM64_R64,
    Code.TEST_RM64_R64, Code.MOV_RM64_R64, Code.IMUL_R64_RM64, Code.CMOVE_R64_RM64,
]  # fmt: skip
REG_IMM8 = [Code.ADD_RM64_IMM8, Code.SUB_RM64_IMM8, Code.CMP_RM64_IMM8, Code.AND_RM64_IMM8]
REG_IMM32 = [Code.ADD_RM64_IMM32, Code.XOR_RM64_IMM32, Code.CMP_RM64_IMM32, Code.TEST_RM64_IMM32]
SHIFTS = [Code.SHL_RM64_IMM8, Code.SHR_RM64_IMM8, Code.SAR_RM64_IMM8, Code.ROL_RM64_IMM8]
UNARY = [Code.INC_RM64, Code.DEC_RM64, Code.NEG_RM64, Code.NOT_RM64, Code.PUSH_R64, Code.POP_R64]
RIP_LOADS = [Code.MOV_R64_RM64, Code.ADD_R64_RM64, Code.CMP_R64_RM64, Code.LEA_R64_M]

registers = st.sampled_from(GPRS)
data = st.integers(0, PAGE - 8).map(lambda offset: DATA + offset)
pads = st.sampled_from(PADS)


def rip(address: int) -> MemoryOperand:
    return MemoryOperand(Register.RIP, displ=address)


short_target = st.one_of(
    st.integers(1, 40).map(lambda back: SITE - back),
    st.integers(0, 31).map(lambda ahead: FORWARD + ahead),
)
body_instruction = st.one_of(
    st.builds(Instruction.create_reg_reg, st.sampled_from(REG_REG), registers, registers),
    st.builds(
        Instruction.create_reg_i32, st.sampled_from(REG_IMM8), registers, st.integers(-128, 127)
    ),
    st.builds(
        Instruction.create_reg_i32,
        st.sampled_from(REG_IMM32),
        registers,
        st.integers(-(2**31), 2**31 - 1),
    ),
    st.builds(Instruction.create_reg_u32, st.sampled_from(SHIFTS), registers, st.integers(0, 63)),
    st.builds(Instruction.create_reg, st.sampled_from(UNARY), registers),
    st.builds(Instruction.create_reg_mem, st.sampled_from(RIP_LOADS), registers, data.map(rip)),
    st.builds(
        Instruction.create_reg_mem,
        st.just(Code.LEA_R64_M),
        registers,
        st.sampled_from([SITE - 0x1000, SITE + 0x12345, STACK]).map(rip),
    ),
    st.builds(Instruction.create_mem_reg, st.just(Code.MOV_RM64_R64), data.map(rip), registers),
    st.builds(
        Instruction.create_mem_i32,
        st.just(Code.CMP_RM64_IMM8),
        data.map(rip),
        st.integers(-128, 127),
    ),
    st.builds(Instruction.create_branch, st.sampled_from(SHORT_BRANCHES), short_target),
)
last_instruction = st.one_of(
    st.none(),
    st.builds(Instruction.create_branch, st.just(Code.CALL_REL32_64), pads),
    st.builds(Instruction.create_branch, st.just(Code.JMP_REL8_64), short_target),
    st.builds(
        Instruction.create_mem,
        st.just(Code.CALL_RM64),
        st.integers(0, 0x40).map(lambda k: rip(POINTERS + 8 * k)),
    ),
    # Pushes and pops move rsp by at most 6 * 8 bytes, so [rsp+0x80] is never
    # a slot that a push overwrote: it always holds a landing pad.
    st.builds(
        Instruction.create_mem,
        st.just(Code.CALL_RM64),
        st.just(MemoryOperand(Register.RSP, displ=0x80)),
    ),
    st.just(Instruction.create(Code.RETNQ)),
)
interesting = st.sampled_from([0, 1, 2, 2**31, 2**32, 2**63, 2**64 - 1])
register_values = st.one_of(interesting, st.integers(0, 2**64 - 1))
ARITHMETIC_FLAGS = 0x8D5  # CF PF AF ZF SF OF
relocation_pages = st.one_of(
    st.integers(0x100, CODE // PAGE - 0x10),  # below the module
    st.integers(STACK // PAGE + 0x10, 0x8F00_0000 // PAGE),  # above, up to ~2 GiB away
)


def assemble(instructions: list[Instruction], address: int) -> bytes:
    """Encode exactly as given: short branches must stay short in the original."""
    encoder = Encoder(64)
    code = bytearray()
    for instruction in instructions:
        encoder.encode(instruction, address + len(code))
        code += encoder.take_buffer()
    return bytes(code)


def world(seed: int) -> dict[int, bytes]:
    rng = random.Random(seed)
    return {
        CODE: b"\xcc" * 2 * PAGE,
        DATA: rng.randbytes(PAGE),
        POINTERS: b"".join(rng.choice(PADS).to_bytes(8, "little") for _ in range(PAGE // 8)),
        STACK: b"".join(rng.choice(PADS).to_bytes(8, "little") for _ in range(STACK_SIZE // 8)),
    }


def execute(memory: dict[int, bytes], start: int, end: int, state: dict[str, int]) -> Outcome:
    return run(memory, start, end, state, watch=[(DATA, PAGE), (STACK, STACK_SIZE)])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.lists(body_instruction, min_size=1, max_size=6),
    last=last_instruction,
    values=st.lists(register_values, min_size=len(GPRS), max_size=len(GPRS)),
    flags=st.integers(0, ARITHMETIC_FLAGS),
    seed=st.integers(0, 2**32),
    page=relocation_pages,
    offset=st.integers(0, PAGE - 0x100),
)
def test_relocated_code_behaves_like_the_original(
    body: list[Instruction],
    last: Instruction | None,
    values: list[int],
    flags: int,
    seed: int,
    page: int,
    offset: int,
) -> None:
    if last is not None and last.code == Code.RETNQ:
        # ret must pop a landing pad, not a value the body pushed.
        assume(all(instruction.code != Code.PUSH_R64 for instruction in body))
    original = assemble([*body, *([last] if last is not None else [])], SITE)
    assert SITE + len(original) < FORWARD
    displaced = decode(original, SITE)
    site_end = SITE + len(original)
    new_address = page * PAGE + offset
    relocated = relocate(displaced, new_address, return_to=site_end)

    memory = world(seed)
    memory[CODE] = memory[CODE][: SITE - CODE] + original + memory[CODE][site_end - CODE :]
    memory[page * PAGE] = (b"\xcc" * offset + relocated).ljust(2 * PAGE, b"\xcc")
    state = dict(zip(GPR_NAMES, values, strict=True))
    state["rsp"] = RSP
    state["rflags"] = 0x2 | (flags & ARITHMETIC_FLAGS)

    expected = execute(memory, SITE, site_end, state)
    actual = execute(memory, new_address, new_address + len(relocated), state)

    assert actual.exit == expected.exit
    assert actual.registers == expected.registers
    assert actual.memory == expected.memory
