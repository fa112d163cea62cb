"""What a patchlet body does with the stack: rsp's depth at each instruction, the
stack memory it reads and writes, and rsp wherever it leaves.

A body starts with the rsp it is given (its *entry* rsp, E). This walks its
control flow from the first instruction, in the spirit of the kernel's objtool
stack validation: pushes, pops, `sub`/`add rsp, imm`, `lea rsp, [...]`, `mov
rsp, reg` and `leave` move rsp by a known amount; a call returns with rsp as
it was (the System V ABI); registers copied from rsp (`mov rcx, rsp`, `lea
rcx, [rsp+8]`) stay known as E plus a constant, and so do registers copied
from the function's rbp, which CFA rules may be based on. Where two paths meet
with different depths, after `and rsp, -16`, `mov rsp, rax` or anything else
that moves rsp by an amount not known here, the depth is unknown, with the
reason; every decision that needs it is then refused by the caller.

Offsets are relative to E (for "rsp") or to the rbp the body starts with (for
"rbp"). Nothing here decides what is allowed: `bodies.frame` does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from iced_x86 import (
    FlowControl,
    Instruction,
    InstructionInfoFactory,
    MemorySizeExt,
    Mnemonic,
    OpAccess,
    OpKind,
    Register,
    Register_,
    RegisterExt,
)

from micropatch.arch.x86_64.decode import decode, format_instruction, is_call, is_invalid

_WRITES = frozenset(
    {OpAccess.WRITE, OpAccess.COND_WRITE, OpAccess.READ_WRITE, OpAccess.READ_COND_WRITE}
)
_READS = frozenset(
    {OpAccess.READ, OpAccess.COND_READ, OpAccess.READ_WRITE, OpAccess.READ_COND_WRITE}
)
# Registers a call may change (System V): copies of rsp in them are lost.
_CALL_CLOBBERED = frozenset(
    int(r)
    for r in (
        Register.RAX, Register.RCX, Register.RDX, Register.RSI, Register.RDI,
        Register.R8, Register.R9, Register.R10, Register.R11,
    )
)  # fmt: skip
_SYSCALL_CLOBBERED = frozenset(int(r) for r in (Register.RAX, Register.RCX, Register.R11))
_TRAPS = frozenset({FlowControl.INTERRUPT, FlowControl.EXCEPTION})

Value = tuple[str, int, int]
"""("rsp", c, origin): E + c; ("rbp", c, origin): the entry rbp + c. `origin`: the
ip of the instruction that read rsp to make it (-1 for the entry rbp)."""


@dataclass(frozen=True)
class Access:
    """An explicit memory operand based on rsp or on a register known from rsp or
    rbp. `offset` is from the anchor (E or the entry rbp); None if an index
    register or an unknown depth makes it unknown."""

    ip: int
    text: str
    anchor: str  # "rsp" or "rbp"
    offset: int | None
    size: int
    read: bool
    write: bool
    origin: int  # the ip whose rsp operand made the address (`ip` for [rsp+N] itself)


@dataclass(frozen=True)
class Exit:
    """Where control leaves the body: `kind` is "end" (it falls through its end:
    on to the displaced instructions), "jump" (to `target`, None if indirect) or
    "return". `depth` is E minus rsp there (0: rsp back at entry), None if unknown."""

    ip: int
    text: str
    kind: str
    target: int | None
    depth: int | None


@dataclass
class StackTrace:
    """The walk's result. `depths` maps each reachable instruction to E minus rsp
    before it (None: unknown); unreachable instructions (data, or code reached
    only by a call, such as a C body's function) are absent."""

    start: int
    end: int
    depths: dict[int, int | None] = field(default_factory=dict)
    texts: dict[int, str] = field(default_factory=dict)
    accesses: list[Access] = field(default_factory=list)
    exits: list[Exit] = field(default_factory=list)
    unknown: dict[int, str] = field(default_factory=dict)  # ip -> why the depth is lost there
    calls: list[int] = field(default_factory=list)
    # A call into the body, or an indirect call or jump: code the walk does not
    # reach may still run (with a depth this walk does not know).
    hidden_entries: bool = False
    # ip -> the displacement of its explicit rsp-based memory operand (lea included)
    rsp_operands: dict[int, int] = field(default_factory=dict)
    pushes_below: bool = False  # a push, call or rsp lowered: something goes below E
    undecodable: bool = False

    def why_unknown(self) -> str:
        """The first reason the depth became unknown, for messages."""
        if not self.unknown:
            return "the stack depth is not known there"
        ip, reason = min(self.unknown.items())
        return f"{reason} (`{self.texts.get(ip, '?')}`, body+{ip - self.start:#x})"


@dataclass(frozen=True)
class _State:
    depth: int | None
    registers: tuple[tuple[int, Value], ...]  # sorted (register, value)
    # Registers that may hold an address from rsp at an offset not known here (two
    # paths joining with different ones, or made from such a register).
    unsure: frozenset[int] = frozenset()

    def get(self, register: int) -> Value | None:
        return dict(self.registers).get(register)


def trace(code: bytes, address: int) -> StackTrace:
    """Walk `code` (a body assembled at `address`) from its first instruction,
    decoding where control goes (not linearly: data may sit between code)."""
    result = StackTrace(address, address + len(code))
    if not code:
        result.exits.append(Exit(address, "(end)", "end", None, 0))
        return result
    instructions: dict[int, Instruction] = {}
    states: dict[int, _State] = {}
    work = [(address, _State(0, ((int(Register.RBP), ("rbp", 0, -1)),)))]
    while work:
        ip, state = work.pop()
        old = states.get(ip)
        joined = state if old is None else _join(old, state, ip, result)
        if joined == old:
            continue
        states[ip] = joined
        here = instructions.get(ip)
        if here is None:
            here = instructions[ip] = _decode_at(code, address, ip)
            result.texts[ip] = format_instruction(here)
            result.undecodable = result.undecodable or is_invalid(here)
        after = _step(here, joined, result)
        for successor in _successors(here, result):
            work.append((successor, after))
    _record(instructions, states, result)
    return result


def _decode_at(code: bytes, address: int, ip: int) -> Instruction:
    offset = ip - address
    return decode(code[offset : offset + 15], ip)[0]


def _join(a: _State, b: _State, ip: int, result: StackTrace) -> _State:
    depth = a.depth
    if a.depth != b.depth:
        depth = None
        if a.depth is not None and b.depth is not None:
            result.unknown.setdefault(
                ip,
                f"two paths reach it with rsp at different depths ({a.depth:#x} and "
                f"{b.depth:#x} below the entry rsp): a branch joining different depths, "
                "or a loop that moves rsp",
            )
    common = set(a.registers) & set(b.registers)
    unsure = set(a.unsure | b.unsure)
    for register, value in (set(a.registers) | set(b.registers)) - common:
        if value[0] == "rsp":
            unsure.add(register)
    return _State(depth, tuple(sorted(common)), frozenset(unsure - {r for r, _ in common}))


def _successors(ins: Instruction, result: StackTrace) -> Iterator[int]:
    """The instructions of the body that may run next (exits are recorded later)."""
    flow = ins.flow_control
    if flow in (FlowControl.RETURN, FlowControl.INDIRECT_BRANCH) or flow in _TRAPS:
        return
    if is_invalid(ins):
        return
    target = _branch_target(ins)
    if flow in (FlowControl.UNCONDITIONAL_BRANCH, FlowControl.CONDITIONAL_BRANCH):
        if target is not None and result.start <= target < result.end:
            yield target
        if flow == FlowControl.UNCONDITIONAL_BRANCH:
            return
    if ins.next_ip < result.end:
        yield ins.next_ip


def _branch_target(ins: Instruction) -> int | None:
    for operand in range(ins.op_count):
        if ins.op_kind(operand) == OpKind.NEAR_BRANCH64:
            return int(ins.near_branch_target)
    return None


def _full(register: Register_) -> int:
    return int(RegisterExt.full_register(register))


def _step(ins: Instruction, state: _State, result: StackTrace) -> _State:
    """The state after `ins` (a call: after it returns)."""
    depth = state.depth
    registers = dict(state.registers)
    mnemonic = ins.mnemonic
    writes = _written_registers(ins)
    increment = ins.stack_pointer_increment
    destination = 0
    if ins.op_count and ins.op0_kind == OpKind.REGISTER:
        destination = _full(ins.op0_register)
    source = _source_value(ins, state)

    if is_call(ins) or mnemonic == Mnemonic.SYSCALL:
        lost = _CALL_CLOBBERED if is_call(ins) else _SYSCALL_CLOBBERED
        kept = {r: v for r, v in registers.items() if r not in lost}
        return _State(depth, tuple(sorted(kept.items())), state.unsure - lost)

    new_depth = depth
    if increment and destination != Register.RSP and mnemonic != Mnemonic.LEAVE:
        # push, pop, pushfq, popfq, enter: rsp moves by what the instruction says
        new_depth = None if depth is None else depth - increment
    elif Register.RSP in writes:
        new_depth = _rsp_after(ins, depth, registers, source, result)
    writes.discard(Register.RSP)
    for written in writes:
        registers.pop(written, None)
    unsure = set(state.unsure) - writes
    if destination and destination != Register.RSP and destination in writes:
        value = _derived(ins, state, source)
        if value is not None:
            registers[destination] = value
        elif _read_registers(ins) & state.unsure:
            unsure.add(destination)  # made from an address of unknown offset
    if new_depth is not None and new_depth > 0:
        result.pushes_below = True
    return _State(new_depth, tuple(sorted(registers.items())), frozenset(unsure))


def _rsp_after(
    ins: Instruction,
    depth: int | None,
    registers: dict[int, Value],
    source: Value | None,
    result: StackTrace,
) -> int | None:
    mnemonic = ins.mnemonic
    immediate = _immediate(ins)
    if depth is not None and mnemonic in (Mnemonic.ADD, Mnemonic.SUB) and immediate is not None:
        return depth - immediate if mnemonic == Mnemonic.ADD else depth + immediate
    if mnemonic == Mnemonic.LEAVE:
        rbp = registers.get(Register.RBP)
        if rbp is not None and rbp[0] == "rsp":
            return -(rbp[1] + 8)
    elif mnemonic in (Mnemonic.LEA, Mnemonic.MOV) and source is not None and source[0] == "rsp":
        return -source[1]
    result.unknown.setdefault(ins.ip, "rsp is set to a value not known from the entry rsp")
    return None


def _immediate(ins: Instruction) -> int | None:
    if ins.op_count != 2 or ins.op1_kind == OpKind.REGISTER or ins.op1_kind == OpKind.MEMORY:
        return None
    value = int(ins.immediate(1))
    return value - (1 << 64) if value >= 1 << 63 else value


def _source_value(ins: Instruction, state: _State) -> Value | None:
    """What `mov`/`lea` of a 64-bit register would set: E or the entry rbp + c."""
    if ins.op_count != 2 or ins.op0_kind != OpKind.REGISTER:
        return None
    if RegisterExt.size(ins.op0_register) != 8:
        return None
    if ins.mnemonic == Mnemonic.MOV and ins.op1_kind == OpKind.REGISTER:
        return _register_value(ins.op1_register, state, ins.ip)
    if ins.mnemonic == Mnemonic.LEA and ins.memory_index == Register.NONE:
        base = _register_value(ins.memory_base, state, ins.ip)
        if base is not None:
            return base[0], base[1] + _displacement(ins), base[2]
    return None


def _register_value(register: Register_, state: _State, ip: int) -> Value | None:
    """A register's value before the instruction at `ip` (rsp's made there)."""
    if register == Register.RSP:
        return None if state.depth is None else ("rsp", -state.depth, ip)
    return state.get(register)


def _derived(ins: Instruction, state: _State, source: Value | None) -> Value | None:
    """The value `ins` gives its destination register, if known from E or rbp."""
    if source is not None:
        return source
    value = state.get(_full(ins.op0_register))
    immediate = _immediate(ins)
    if value is None or immediate is None or RegisterExt.size(ins.op0_register) != 8:
        return None
    if ins.mnemonic == Mnemonic.ADD:
        return value[0], value[1] + immediate, value[2]
    if ins.mnemonic == Mnemonic.SUB:
        return value[0], value[1] - immediate, value[2]
    return None


def _displacement(ins: Instruction) -> int:
    value = int(ins.memory_displacement)
    return value - (1 << 64) if value >= 1 << 63 else value


def _written_registers(ins: Instruction) -> set[int]:
    info = InstructionInfoFactory().info(ins)
    return {_full(r.register) for r in info.used_registers() if r.access in _WRITES}


def _read_registers(ins: Instruction) -> set[int]:
    info = InstructionInfoFactory().info(ins)
    return {_full(r.register) for r in info.used_registers() if r.access in _READS}


def _record(
    instructions: dict[int, Instruction], states: dict[int, _State], result: StackTrace
) -> None:
    """Depths, stack accesses and exits of every reachable instruction."""
    for ip in sorted(states):
        ins = instructions[ip]
        state = states[ip]
        result.depths[ip] = state.depth
        text = result.texts[ip]
        if is_call(ins):
            result.calls.append(ip)
            result.pushes_below = True
            target = _branch_target(ins)
            if target is None or result.start <= target < result.end:
                result.hidden_entries = True
        elif ins.flow_control == FlowControl.INDIRECT_BRANCH:
            result.hidden_entries = True
        elif ins.stack_pointer_increment < 0 or is_invalid(ins):
            result.pushes_below = True
        result.accesses.extend(_accesses(ins, state, text))
        memory = any(ins.op_kind(n) == OpKind.MEMORY for n in range(ins.op_count))
        if memory and ins.memory_base == Register.RSP:
            result.rsp_operands[ip] = _displacement(ins)
        _exits(ins, state, text, result)


def _accesses(ins: Instruction, state: _State, text: str) -> Iterator[Access]:
    info = InstructionInfoFactory().info(ins)
    for operand in range(ins.op_count):
        if ins.op_kind(operand) != OpKind.MEMORY:
            continue
        access = info.op_access(operand)
        if access == OpAccess.NO_MEM_ACCESS:
            continue  # lea: an address, not an access
        base, index = ins.memory_base, ins.memory_index
        value = _register_value(base, state, ins.ip)
        if base == Register.RSP and value is None:
            value = ("rsp", 0, ins.ip)  # anchored on rsp, at an unknown depth
            offset = None
        elif value is not None:
            offset = value[1] + _displacement(ins)
        elif (
            _register_value(index, state, ins.ip) is not None
            or index == Register.RSP
            or {_full(base), _full(index)} & state.unsure
        ):
            value, offset = ("rsp", 0, ins.ip), None  # from rsp, at an offset not known
        else:
            continue
        if index != Register.NONE:
            offset = None
        yield Access(
            ins.ip,
            text,
            value[0],
            offset,
            int(MemorySizeExt.size(ins.memory_size)),
            access in _READS,
            access in _WRITES,
            value[2],
        )


def _exits(ins: Instruction, state: _State, text: str, result: StackTrace) -> None:
    flow = ins.flow_control
    if flow == FlowControl.RETURN:
        result.exits.append(Exit(ins.ip, text, "return", None, state.depth))
        return
    if flow == FlowControl.INDIRECT_BRANCH:
        result.exits.append(Exit(ins.ip, text, "jump", None, state.depth))
        return
    if flow in _TRAPS or is_invalid(ins):
        return
    target = _branch_target(ins)
    if not is_call(ins) and target is not None:
        if target == result.end:
            result.exits.append(Exit(ins.ip, text, "end", None, state.depth))
        elif not result.start <= target < result.end:
            result.exits.append(Exit(ins.ip, text, "jump", target, state.depth))
        if flow == FlowControl.UNCONDITIONAL_BRANCH:
            return
    if ins.next_ip >= result.end:
        result.exits.append(Exit(ins.ip, text, "end", None, _after_depth(ins, state)))


def _after_depth(ins: Instruction, state: _State) -> int | None:
    """E minus rsp after the last instruction, for the fall-through exit."""
    return _step(ins, state, StackTrace(0, 0)).depth
