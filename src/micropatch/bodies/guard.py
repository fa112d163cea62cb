"""Guards compiled to assembly: the code a `when` + `then` patchlet runs.

The generated code saves the flags and two scratch registers, evaluates the
condition, restores them, then either takes the action or falls through to
the displaced instructions, so a guard changes no register or flag unless its
action says so. It pushes, so the engine steps over the red zone before it
except at a function's entry.
"""

from __future__ import annotations

from micropatch.patch.guard import Action, GuardError, Jump, Return
from micropatch.patch.guardtree import (
    REGISTERS_64,
    TYPES,
    And,
    Compare,
    Condition,
    IntType,
    Literal,
    Memory,
    Not,
    Operand,
    Or,
    Register,
    Truth,
    register_name,
    registers_used,
)

# Scratch registers, most preferred first: ones compilers rarely keep live
# across a function's body come first, to keep the guard's code short.
_SCRATCH_ORDER = (
    "r11", "r10", "rax", "rcx", "rdx", "r9", "r8", "rsi", "rdi",
    "rbx", "rbp", "r12", "r13", "r14", "r15",
)  # fmt: skip

_SIGNED_JCC = {"<": "jl", "<=": "jle", ">": "jg", ">=": "jge", "==": "je", "!=": "jne"}
_UNSIGNED_JCC = {"<": "jb", "<=": "jbe", ">": "ja", ">=": "jae", "==": "je", "!=": "jne"}
_NEGATED = {"<": ">=", "<=": ">", ">": "<=", ">=": "<", "==": "!=", "!=": "=="}
# Comparisons that hold when the left side is greater / smaller than the right.
_HOLD_IF_GREATER = frozenset({">", ">=", "!="})
_HOLD_IF_SMALLER = frozenset({"<", "<=", "!="})
_MIRRORED = {"<": ">", "<=": ">=", ">": "<", ">=": "<=", "==": "==", "!=": "!="}
_IMM32_MIN = -(1 << 31)
_IMM32_END = 1 << 31


def _hex(value: int) -> str:
    return f"-{-value:#x}" if value < 0 else f"{value:#x}"


class _Generator:
    """Branching code for a condition, with two scratch registers. The site's rsp
    is `frame` (`bodies.frame`): the assembler adds whatever the guard pushed."""

    def __init__(self, scratch: tuple[str, str]) -> None:
        self.scratch = scratch
        self.lines: list[str] = []
        self.labels = 0

    def label(self) -> str:
        self.labels += 1
        return f"mp_guard_{self.labels}"

    def emit(self, line: str) -> None:
        self.lines.append(line)

    def jump_if(self, condition: Condition, target: str, when: bool) -> None:
        """Jump to `target` if `condition` evaluates to `when`; else fall through."""
        if isinstance(condition, Not):
            self.jump_if(condition.operand, target, not when)
        elif isinstance(condition, And | Or):
            # `a && b` jumps on false as soon as one part is false; on true only
            # if both are. `a || b` is the mirror image.
            short = isinstance(condition, And) != when
            if short:
                self.jump_if(condition.left, target, when)
                self.jump_if(condition.right, target, when)
            else:
                skip = self.label()
                self.jump_if(condition.left, skip, not when)
                self.jump_if(condition.right, target, when)
                self.emit(f"{skip}:")
        elif isinstance(condition, Truth):
            register = self.load(condition.operand, self.scratch[0])[0]
            self.emit(f"test {register}, {register}")
            self.emit(f"{'jne' if when else 'je'} {target}")
        else:
            self.compare(condition, target, when)

    def compare(self, condition: Compare, target: str, when: bool) -> None:
        op = condition.op if when else _NEGATED[condition.op]
        left_operand, right_operand = condition.left, condition.right
        if isinstance(left_operand, Literal) and not isinstance(right_operand, Literal):
            left_operand, right_operand, op = right_operand, left_operand, _MIRRORED[op]
        if isinstance(right_operand, Literal) and _IMM32_MIN <= right_operand.value < _IMM32_END:
            # The common case, `esi > 64`: compare with an immediate.
            left, left_u64 = self.load(left_operand, self.scratch[0])
            if left_u64 and right_operand.value < 0:
                if op in _HOLD_IF_GREATER:  # a u64 is greater than any negative number
                    self.emit(f"jmp {target}")
                return
            jcc = (_UNSIGNED_JCC if left_u64 else _SIGNED_JCC)[op]
            self.emit(f"cmp {left}, {_hex(right_operand.value)}")
            self.emit(f"{jcc} {target}")
            return
        left, left_u64 = self.load(left_operand, self.scratch[0])
        right, right_u64 = self.load(right_operand, self.scratch[1])
        if left_u64 == right_u64:
            jcc = (_UNSIGNED_JCC if left_u64 else _SIGNED_JCC)[op]
            self.emit(f"cmp {left}, {right}")
            self.emit(f"{jcc} {target}")
            return
        # One side is a u64, the other signed. If the signed side is negative
        # the answer is known; otherwise both are in [0, 2**64): compare unsigned.
        signed, holds = (right, _HOLD_IF_GREATER) if left_u64 else (left, _HOLD_IF_SMALLER)
        skip = self.label()
        self.emit(f"test {signed}, {signed}")
        self.emit(f"js {target if op in holds else skip}")
        self.emit(f"cmp {left}, {right}")
        self.emit(f"{_UNSIGNED_JCC[op]} {target}")
        self.emit(f"{skip}:")

    def load(self, operand: Operand, register: str) -> tuple[str, bool]:
        """Put the operand's value, extended to 64 bits, in `register`; return
        the register and whether the value must be read as unsigned (a u64)."""
        if isinstance(operand, Literal):
            self.emit(f"mov {register}, {_hex(operand.value)}")
            return register, operand.value >= 1 << 63
        if isinstance(operand, Register):
            if operand.name == "rsp":
                self.emit(f"lea {register}, [frame]")
            elif operand.name in REGISTERS_64:
                self.emit(f"mov {register}, {operand.name}")
            else:
                self.emit(f"movsxd {register}, {operand.name}")
            return register, False
        if isinstance(operand, Memory):
            address = self.address(operand)
            self.emit(_extend(register, operand.type, address))
            return register, operand.type == TYPES["u64"]
        self.load(operand.operand, register)
        if operand.type.bits < 64:
            self.emit(_extend(register, operand.type, None))
        return register, operand.type == TYPES["u64"]

    def address(self, memory: Memory) -> str:
        disp = memory.disp
        if not -(1 << 31) <= disp < 1 << 31:
            raise GuardError(f"displacement {disp:#x} does not fit in 32 bits")
        text = "frame" if memory.base == "rsp" else memory.base
        if memory.index:
            text += f" + {memory.index}*{memory.scale}"
        if disp:
            text += f" + {disp:#x}" if disp > 0 else f" - {-disp:#x}"
        return f"[{text}]"


_PTR = {8: "byte", 16: "word", 32: "dword", 64: "qword"}


def _extend(register: str, type_: IntType, memory: str | None) -> str:
    """One instruction: `register` = the `type_.bits`-bit value at `memory`
    (or in the register's own low bits) extended as `type_` says."""
    source = f"{_PTR[type_.bits]} ptr {memory}" if memory else register_name(register, type_.bits)
    if type_.bits == 64:
        return f"mov {register}, {source}"
    if type_.bits == 32:
        if type_.signed:
            return f"movsxd {register}, {source}"
        return f"mov {register_name(register, 32)}, {source}"
    if type_.signed:
        return f"movsx {register}, {source}"
    return f"movzx {register_name(register, 32)}, {source}"


AT_ENTRY_ONLY = (
    "is only possible at a function's entry (offset 0 of a function, where the "
    "return address is on top of the stack); mid-function the stack frame is unknown, "
    "so jump to the function's existing error path instead (jump LOCATION)"
)


def guard_source(
    when: Condition, then: Action, *, at_entry: bool, counter: int | None = None
) -> str:
    """Assembly for a guard, to be assembled where the trampoline body runs.

    It relies on the engine's red-zone rule: the code pushes, so the engine
    moves rsp down by the red zone before it, except at a function's entry
    (`at_entry`); `[frame+N]` is the site's `[rsp+N]` either way. `counter` is
    the address of the patchlet's 64-bit `blocked` counter, required when the
    action says `blocked`.
    """
    if isinstance(then.outcome, Return) and not at_entry:
        raise GuardError(f"then: 'return' {AT_ENTRY_ONLY}")
    if then.blocked and counter is None:
        raise GuardError(
            "then: 'blocked' needs a blocked-event counter, which this engine does not "
            "provide yet; remove 'blocked;'"
        )
    used = registers_used(when)
    free = [r for r in _SCRATCH_ORDER if r not in used]
    if len(free) < 2:
        raise GuardError("when: the condition reads too many registers to leave two for scratch")
    scratch = (free[0], free[1])
    generator = _Generator(scratch)
    emit = generator.emit
    restore = [f"pop {scratch[1]}", f"pop {scratch[0]}", "popfq"]
    emit("pushfq")
    emit(f"push {scratch[0]}")
    emit(f"push {scratch[1]}")
    generator.jump_if(when, "mp_guard_false", False)
    if then.blocked:
        assert counter is not None
        emit(f"mov {scratch[0]}, {counter:#x}")
        emit(f"lock inc qword ptr [{scratch[0]}]")
    generator.lines += restore
    outcome = then.outcome
    if isinstance(outcome, Jump):
        if not at_entry:
            emit("lea rsp, [frame]")  # back above the red zone the engine stepped over
        emit(f"jmp {{{outcome.location}}}")
    else:
        if outcome.value is not None:
            emit(f"mov rax, {_hex(outcome.value)}")
        emit("ret")
    emit("mp_guard_false:")
    generator.lines += restore
    return "\n".join(generator.lines) + "\n"
