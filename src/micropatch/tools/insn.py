"""The one seam between the author tools and the x86-64 layer.

Every other module of tools/ takes its decoding, formatting and site planning
from here, so moving the architecture code is a change to this file alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, cast

from iced_x86 import (
    Code,
    Decoder,
    FlowControl,
    Instruction,
    Mnemonic,
    OpKind,
    Register,
    RegisterExt,
)

from micropatch.arch.x86_64.decode import IMMEDIATE_KINDS

if TYPE_CHECKING:
    from iced_x86._iced_x86_py import Register as RegisterValue

from micropatch.arch.x86_64.decode import decode, format_instruction, is_call, near_branch_target
from micropatch.arch.x86_64.site import Site, plan_site

__all__ = [
    "Instruction",
    "Roles",
    "Shape",
    "Shapes",
    "Site",
    "decode",
    "ends_flow",
    "format_instruction",
    "is_call",
    "is_conditional",
    "is_padding",
    "is_return",
    "kept_constants",
    "near_branch_target",
    "plan_site",
    "restores_frame",
    "role",
    "summarise",
]


def _register_classes() -> dict[int, object]:
    """Registers a compiler allocates freely (callee-saved, r10/r11, vectors) map to
    their class and size; the ABI's argument, return and stack registers stay."""
    free = {Register.RBX, Register.RBP, Register.R10, Register.R11}
    free |= {Register.R12, Register.R13, Register.R14, Register.R15}
    classes: dict[int, object] = {}
    for name in dir(Register):
        value = getattr(Register, name)
        if not isinstance(value, int) or name.startswith("_"):
            continue
        register = cast("RegisterValue", value)
        if RegisterExt.is_gpr(register) and RegisterExt.full_register(register) in free:
            classes[register] = ("g", RegisterExt.size(register))
        elif RegisterExt.is_vector_register(register):
            classes[register] = ("v", RegisterExt.size(register))
    return classes


# Read-only after import.
_REGISTER_CLASS = _register_classes()
_SIGN_EXTENDED = frozenset({OpKind.IMMEDIATE8TO64, OpKind.IMMEDIATE32TO64})
_SIGNED_64 = 1 << 64
_STACK_POINTERS = frozenset({Register.RSP, Register.ESP})
_ENDS_FLOW = frozenset(
    {
        FlowControl.UNCONDITIONAL_BRANCH,
        FlowControl.INDIRECT_BRANCH,
        FlowControl.RETURN,
        FlowControl.EXCEPTION,
        FlowControl.INTERRUPT,
    }
)


def is_conditional(instruction: Instruction) -> bool:
    """True for a conditional branch (jcc, loop, jrcxz)."""
    return instruction.flow_control == FlowControl.CONDITIONAL_BRANCH


def ends_flow(instruction: Instruction) -> bool:
    """True if execution never falls through to the next instruction (jmp, ret, ud2)."""
    return instruction.flow_control in _ENDS_FLOW


def is_return(instruction: Instruction) -> bool:
    """True for a return (ret)."""
    return instruction.flow_control == FlowControl.RETURN


def restores_frame(instruction: Instruction) -> bool:
    """True for an epilogue's work: pop, leave, or moving the stack pointer."""
    return instruction.mnemonic in _FRAME_RESTORES or (
        instruction.op0_kind == OpKind.REGISTER and instruction.op0_register in _STACK_POINTERS
    )


_FRAME_RESTORES = frozenset({Mnemonic.POP, Mnemonic.LEAVE})
_MULTIPLIES = frozenset({Mnemonic.IMUL, Mnemonic.MUL})
_MULTIPLIER_REACH = 4  # instructions between a mov of a magic number and its mul


def kept_constants(instructions: Sequence[Instruction]) -> tuple[set[int], set[int]]:
    """(immediates, compared immediates) of a function, as a compiler keeps them
    from the source: without the stack frame's size (add/sub rsp) and without
    multipliers (a division by a constant becomes a multiplication by a magic
    number: the immediate of a mul, or of a mov a mul follows closely), which
    change with the compiler. Compared: the immediates of cmp and test."""
    found: set[int] = set()
    compared: set[int] = set()
    for at, instruction in enumerate(instructions):
        mnemonic = instruction.mnemonic
        if mnemonic in _MULTIPLIES or (
            instruction.op0_kind == OpKind.REGISTER and instruction.op0_register in _STACK_POINTERS
        ):
            continue
        if mnemonic == Mnemonic.MOV and any(
            later.mnemonic in _MULTIPLIES
            for later in instructions[at + 1 : at + 1 + _MULTIPLIER_REACH]
        ):
            continue
        for operand in range(instruction.op_count):
            kind = instruction.op_kind(operand)
            if kind in IMMEDIATE_KINDS:
                value = _signed(instruction.immediate(operand))
                found.add(value)
                if mnemonic in _COMPARISONS:
                    compared.add(value)
    return found, compared


def _signed(value: int) -> int:
    """An immediate as the source wrote it: negative ones negative, whether the
    compiler encoded them in 8, 32 or 64 bits."""
    if value >= 1 << 63:
        value -= _SIGNED_64
    if 1 << 31 <= value < 1 << 32:
        value -= 1 << 32
    return value


def is_padding(instruction: Instruction) -> bool:
    """True for the no-ops compilers put between blocks for alignment."""
    return instruction.mnemonic == Mnemonic.NOP or instruction.code == Code.XCHG_R16_AX


def summarise(
    instruction: Instruction, small: int
) -> tuple[tuple[object, ...], int | None, list[int]]:
    """One pass over the operands: (shape, near branch target, immediates).

    The shape is the instruction stripped of what moves between builds:
    registers a compiler allocates freely become their class (ABI registers
    stay); immediates stay if their magnitude is below `small`; memory
    operands keep base, index and scale, and a small displacement unless it
    is into the stack frame. Branch targets and RIP-relative addresses are
    left out: the caller adds what they refer to (a string, an import), which
    survives a rebuild.
    """
    classes = _REGISTER_CLASS
    parts: list[object] = [instruction.mnemonic]
    target = None
    values = []
    for operand in range(instruction.op_count):
        kind = instruction.op_kind(operand)
        if kind == OpKind.REGISTER:
            register = instruction.op_register(operand)
            parts.append(classes.get(register, register))
        elif kind == OpKind.MEMORY:
            base = instruction.memory_base
            if base == Register.RIP:
                parts.append("m")
            else:
                displacement = instruction.memory_displacement
                if displacement >= 1 << 63:
                    displacement -= _SIGNED_64
                index = instruction.memory_index
                parts.append(
                    (
                        classes.get(base, base),
                        classes.get(index, index),
                        instruction.memory_index_scale,
                        "s"
                        if base == Register.RSP
                        else displacement
                        if -small < displacement < small
                        else "d",
                    )
                )
        elif kind in IMMEDIATE_KINDS:
            value = instruction.immediate(operand)
            if kind in _SIGN_EXTENDED and value >= 1 << 63:
                value -= _SIGNED_64
            values.append(value)
            parts.append(value if -small < value < small else "i")
        elif kind == OpKind.NEAR_BRANCH64:
            target = instruction.near_branch_target
            parts.append("b")
        else:
            parts.append(kind)
    return tuple(parts), target, values


# What an instruction does to the logic of a function, for `diff`'s ranking.
ROLE_OTHER, ROLE_CONDITION, ROLE_COMPARISON, ROLE_CALL = 0, 1, 2, 3
_CONDITIONAL_DATA = frozenset(
    value
    for name in dir(Mnemonic)
    if name.startswith(("CMOV", "SET")) and len(name) <= 6
    for value in (getattr(Mnemonic, name),)
)
_COMPARISONS = frozenset({Mnemonic.CMP, Mnemonic.TEST})


def role(instruction: Instruction) -> int:
    """ROLE_CONDITION for a conditional branch, move or set (jcc, cmovcc, setcc);
    ROLE_COMPARISON for cmp and test; ROLE_CALL for a call; else ROLE_OTHER."""
    if is_conditional(instruction) or instruction.mnemonic in _CONDITIONAL_DATA:
        return ROLE_CONDITION
    if instruction.mnemonic in _COMPARISONS:
        return ROLE_COMPARISON
    return ROLE_CALL if is_call(instruction) else ROLE_OTHER


class Roles:
    """(role, mnemonic, registers-free form) of instructions, for `diff`'s ranking;
    each distinct encoding worked out once (the cache belongs to the object)."""

    def __init__(self) -> None:
        self._cache: dict[bytes, tuple[int, int, int]] = {}

    def of(self, code: bytes, address: int) -> list[tuple[int, int, int]]:
        """One triple per instruction of `code` that `Shapes.sweep` gives a token to
        (padding aside), in order.

        The registers-free form keeps the mnemonic, each register's size, memory
        operands' shape and small constants: two builds that allocate registers
        differently compare equal; a check of a 16-bit value and one of a 32-bit
        value, or against another bound, do not."""
        found = []
        cache = self._cache
        offset = 0
        for instruction in decode(code, address):
            length = instruction.len
            raw = code[offset : offset + length]
            offset += length
            known = cache.get(raw)
            if known is None:
                if is_padding(instruction):
                    known = (-1, 0, 0)
                else:
                    form = hash(_registers_free(instruction))
                    known = (role(instruction), instruction.mnemonic, form)
                cache[raw] = known
            if known[0] >= 0:
                found.append(known)
        return found


_SMALL = 0x1000  # constants this small stay in a form; larger ones are addresses


def _registers_free(instruction: Instruction) -> tuple[object, ...]:
    parts: list[object] = [instruction.mnemonic]
    for operand in range(instruction.op_count):
        kind = instruction.op_kind(operand)
        if kind == OpKind.REGISTER:
            parts.append(("r", RegisterExt.size(instruction.op_register(operand))))
        elif kind == OpKind.MEMORY:
            if instruction.memory_base == Register.RIP:
                parts.append(("m", "rip", instruction.memory_size))
            else:
                displacement = instruction.memory_displacement
                if displacement >= 1 << 63:
                    displacement -= _SIGNED_64
                small = displacement if -_SMALL < displacement < _SMALL else "d"
                index = instruction.memory_index != Register.NONE
                parts.append(("m", instruction.memory_size, index, small))
        elif kind in IMMEDIATE_KINDS:
            value = instruction.immediate(operand)
            if kind in _SIGN_EXTENDED and value >= 1 << 63:
                value -= _SIGNED_64
            parts.append(value if -_SMALL < value < _SMALL else "i")
        else:
            parts.append(kind)
    return tuple(parts)


class Shape(NamedTuple):
    """What the tools read of one instruction, independent of where it is:
    `summarise`'s form and immediates, and its branch target and RIP-relative
    address as distances from the next instruction. (A named tuple: a module has
    hundreds of thousands of them, and a tuple is the cheapest to make.)"""

    form: tuple[object, ...]
    token: int  # hash((form, None)): the token of an instruction that refers to nothing
    values: tuple[int, ...]
    branch: int | None  # near branch target - next ip
    rip: int | None  # RIP-relative memory address - next ip
    call: bool
    padding: bool
    ends_flow: bool
    conditional: bool
    invalid: bool
    plain: bool  # none of the above: no target, no immediate, not padding, not a block end


Special = tuple[int, int, int, Shape]
"""(index of its token, ip, next ip, shape) of an instruction that is not plain."""


class Shapes:
    """Decodes code into `Shape`s, each distinct instruction encoding analysed once.

    A module repeats its encodings: a 5 MB library has about 750,000 instructions
    and 170,000 distinct encodings. The cache belongs to the object (one per
    module, or per diff): no module-level state.
    """

    def __init__(self, small: int) -> None:
        self.small = small
        self._cache: dict[bytes, Shape] = {}

    def clear(self) -> None:
        """Forget every shape (they are only needed while functions are analysed)."""
        self._cache.clear()

    def sweep(self, code: bytes, address: int) -> tuple[list[int], list[Special]]:
        """The tokens of `code`, decoded linearly from `address` (padding has none),
        and the instructions that need more than their shape: (index of their token,
        ip, next ip, shape) for those that are not `plain`. Their tokens are left
        as 0 for the caller to fill in, since they depend on what they refer to.

        One tight loop: at 750,000 instructions a module, the plain majority costs
        a decode, a slice and a dictionary lookup each."""
        cache = self._cache
        tokens: list[int] = []
        special: list[Special] = []
        decoder = Decoder(64, code, ip=address)
        instruction = Instruction()
        offset = 0
        while decoder.can_decode:
            decoder.decode_out(instruction)
            length = instruction.len
            raw = code[offset : offset + length]
            shape = cache.get(raw)
            if shape is None:
                shape = cache[raw] = self._shape(instruction, address + offset + length)
            if shape.plain:
                tokens.append(shape.token)
            elif not shape.padding:
                ip = address + offset
                special.append((len(tokens), ip, ip + length, shape))
                tokens.append(0)
            offset += length
        return tokens, special

    def _shape(self, instruction: Instruction, next_ip: int) -> Shape:
        form, target, values = summarise(instruction, self.small)
        rip = None
        if instruction.is_ip_rel_memory_operand:
            rip = (instruction.ip_rel_memory_address - next_ip) % (1 << 64)
        padding, ends, invalid = (
            is_padding(instruction),
            ends_flow(instruction),
            instruction.code == Code.INVALID,
        )
        return Shape(
            form,
            hash((form, None)),
            tuple(values),
            None if target is None else target - next_ip,
            rip,
            is_call(instruction),
            padding,
            ends,
            is_conditional(instruction),
            invalid,
            target is None and rip is None and not values and not (padding or ends or invalid),
        )
