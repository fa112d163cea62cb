"""Assemble patchlet code at its final address.

Keystone encodes a jump to an absolute number relative to the address it
assembles at, which is how `jmp {parse_packet_error}` becomes a correct rel32
jump from the cave. But keystone also silently truncates numbers that do not
fit (a jump 4 GiB away, a 64-bit address in a 32-bit displacement), and it
cannot compute `[rip + address]`. So references are resolved here: RIP-relative
ones get their displacement computed from where the instruction landed, and
the output is decoded with iced-x86 to check that every reference arrived
intact before anything is returned.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping

from iced_x86 import Decoder, OpKind
from keystone import (
    KS_ARCH_X86,
    KS_ERR_ASM_FIXUP_INVALID,
    KS_ERR_ASM_SYMBOL_MISSING,
    KS_MODE_64,
    Ks,
    KsError,
)

from micropatch.arch.x86_64.decode import IMMEDIATE_KINDS
from micropatch.arch.x86_64.stack import trace
from micropatch.bodies.frame import Frames, StackContext, check_stack
from micropatch.errors import AssemblyError
from micropatch.patch.asmtext import Line, Reference, parse_code, syntax_problem

# A reference occurrence: (line number, index among the line's pieces).
_Site = tuple[int, int]

_ADDRESS_LIMIT = 1 << 64
# Small enough to fit any operand a real module address could (non-PIE
# executables live at 0x400000), so `check` rejects only real mistakes.
_CHECK_ADDRESS = 0x10000000
# Displacements written in the first pass so each [rip + {ref}] instruction can
# be found in the output; far from any displacement a person would write.
_RIP_MARKER = 0x3A5E0000
_RIP_MARKER_STEP = 0x10
_BRANCH_KINDS = frozenset({OpKind.NEAR_BRANCH16, OpKind.NEAR_BRANCH32, OpKind.NEAR_BRANCH64})
# A reference as the operand of a direct branch: `call {x}`, `jne {x}`, `done: jmp {x}`.
_BRANCH_BEFORE = re.compile(
    r"(?:^|;)\s*(?:[A-Za-z_.][\w.]*\s*:\s*)*(?:(?:bnd|notrack)\s+)?"
    r"(?P<mnemonic>j[a-z]{1,4}|call|loop[a-z]{0,2})\s+$",
    re.IGNORECASE,
)
_ENDS = re.compile(r"\s*(?:;|$)")
# A rel32 reaches +-2 GiB from the end of the branch; a body is far shorter than the margin.
_REL32_REACH = (1 << 31) - (1 << 16)
_REFERENCE_USES = (
    "use a reference as a branch target (jmp/call/jcc {x}), a 64-bit immediate "
    "(mov r64, {x}) or a RIP-relative operand ([rip + {x}])"
)


def check(code: str) -> None:
    """Assemble code with every reference standing for a placeholder address,
    so that mistakes surface when a patch is loaded, not when it is applied."""
    assemble(code, _CHECK_ADDRESS, lambda _location: _CHECK_ADDRESS)


def assemble(
    code: str,
    address: int,
    resolve: Callable[[str], int],
    stack: StackContext | None = None,
) -> bytes:
    """Machine code for `code` placed at `address`, each `{location}` replaced
    by `resolve(location)`, an absolute address.

    `[frame+N]` operands become the function's `[rsp+N]` for a body run
    `stack.step` bytes below the function's rsp (`bodies.frame`); with `stack`,
    the code is also held to the stack rules of `frame.check_stack` there.
    Raises AssemblyError naming the line at fault (StackError for the stack
    rules); exceptions from `resolve` propagate unchanged.
    """
    if not 0 <= address < _ADDRESS_LIMIT:
        raise ValueError(f"address {address:#x} is not a 64-bit address")
    lines = [line for line in parse_code(code) if not line.is_blank]
    if not lines:
        return b""
    values: dict[str, int] = {}
    rip_refs: dict[_Site, tuple[Line, Reference]] = {}
    for line in lines:
        for index, piece in enumerate(line.pieces):
            if isinstance(piece, Reference):
                if piece.location not in values:
                    value = resolve(piece.location)
                    if not 0 <= value < _ADDRESS_LIMIT:
                        raise ValueError(f"{piece.location} resolved to {value:#x}, not an address")
                    values[piece.location] = value
                if piece.rip:
                    rip_refs[line.number, index] = line, piece

    markers = {site: _RIP_MARKER + i * _RIP_MARKER_STEP for i, site in enumerate(rip_refs)}
    step = stack.step if stack is not None else 0
    plain = [_render(line, values, markers) for line in lines]
    frames = Frames(plain, _described(lines))

    def texts(rip: Mapping[_Site, int]) -> list[str]:
        rendered = [_render(line, values, rip) for line in lines]
        return frames.adjusted(rendered) if frames else rendered

    if frames:
        marked = _keystone(lines, frames.marked(plain), address)
        frames.place(trace(marked, address), step)
    _check_reach(lines, values, address)
    machine = _keystone(lines, texts(markers), address)
    if rip_refs:
        next_ips = _marked_instructions(machine, address, markers)
        displacements = {}
        for site, (line, ref) in rip_refs.items():
            marker = markers[site]
            if marker not in next_ips:
                raise AssemblyError(f"{line.describe()}: cannot find the [rip + {{...}}] operand")
            displacement = values[ref.location] - next_ips[marker]
            if not -(1 << 31) <= displacement < 1 << 31:
                raise AssemblyError(
                    f"{line.describe()}: {_named(ref.location, values)} is beyond the "
                    "+-2 GiB reach of a RIP-relative operand"
                )
            displacements[site] = displacement
        first = machine
        machine = _keystone(lines, texts(displacements), address)
        if len(machine) != len(first):
            raise AssemblyError("the code changed size between assembly passes; simplify it")
    _verify(machine, address, lines, values)
    if frames or stack is not None:
        found = trace(machine, address)
        ips = frames.verify(found, step) if frames else set()
        if stack is not None:
            check_stack(found, ips, stack)
    return machine


def _described(lines: list[Line]) -> list[str]:
    return [line.describe() for line in lines]


def _named(location: str, values: Mapping[str, int]) -> str:
    """`{location}` for a message, with its address if it is in the patched module
    (the planner turns those into module offsets). Another module's symbol is
    only placed at a stand-in address when building: no number is shown for it."""
    if "!" in location:
        return f"{{{location}}}"
    return f"{{{location}}} ({values[location]:#x})"


def _check_reach(lines: list[Line], values: Mapping[str, int], address: int) -> None:
    """AssemblyError for a direct branch to a reference beyond a rel32's reach
    (keystone would only say KS_ERR_ASM_FIXUP_INVALID)."""
    for line in lines:
        pieces = line.pieces
        for index, piece in enumerate(pieces):
            if not isinstance(piece, Reference) or piece.rip:
                continue
            before = pieces[index - 1] if index else ""
            after = pieces[index + 1] if index + 1 < len(pieces) else ""
            branch = _BRANCH_BEFORE.search(before) if isinstance(before, str) else None
            if branch is None or not isinstance(after, str) or not _ENDS.match(after):
                continue
            if abs(values[piece.location] - address) < _REL32_REACH:
                continue
            advice = "load its address into a register first (`mov rax, {x}`, then `call rax`)"
            if "!" in piece.location:
                advice = (
                    "another module is usually that far from the patched one: " + advice
                )  # fmt: skip
            raise AssemblyError(
                f"{line.describe()}: {_named(piece.location, values)} is beyond the +-2 GiB "
                f"reach of a rel32 `{branch.group('mnemonic')}` from the trampoline; "
                + advice.replace("{x}", f"{{{piece.location}}}")
            )


def _render(line: Line, values: Mapping[str, int], rip: Mapping[_Site, int]) -> str:
    return "".join(
        piece
        if isinstance(piece, str)
        else hex(rip[line.number, index] if piece.rip else values[piece.location])
        for index, piece in enumerate(line.pieces)
    )


def _keystone(lines: list[Line], rendered: list[str], address: int) -> bytes:
    for line, text in zip(lines, rendered, strict=True):
        if not text.isascii():
            raise AssemblyError(f"{line.describe()}: non-ASCII character outside a comment")
        for statement in text.split(";"):
            problem = syntax_problem(statement)
            if problem is not None:
                raise AssemblyError(f"{line.describe()}: {problem}")
    try:
        return _ks_asm("\n".join(rendered), address)
    except KsError as error:
        missing: list[str] = []
        with contextlib.suppress(KsError):
            _ks_asm("\n".join(rendered), address, missing)
        raise _diagnose(error, lines, rendered, address, missing) from None


def _ks_asm(text: str, address: int, missing: list[str] | None = None) -> bytes:
    """Assemble with keystone; with `missing`, collect the names no label defines.

    Keystone reads decimal numbers as hexadecimal once a symbol resolver is
    set (`cmp edx, 16` becomes `cmp edx, 0x16`), so the resolver is only
    installed to explain a failure, never to produce code.
    """
    ks = Ks(KS_ARCH_X86, KS_MODE_64)
    if missing is not None:
        collected = missing

        # Keystone asks this only about names no label defines; answering "no"
        # leaves its own error in place, and the names say which one was unknown.
        def unknown_symbol(name: bytes, _value: object) -> bool:
            collected.append(name.decode("ascii", "replace"))
            return False

        ks.sym_resolver = unknown_symbol
    encoding, _ = ks.asm(text, address, as_bytes=True)
    return bytes(encoding or b"")


def _diagnose(
    error: KsError, lines: list[Line], rendered: list[str], address: int, missing: list[str]
) -> AssemblyError:
    reason = _reason(error)
    if error.errno == KS_ERR_ASM_SYMBOL_MISSING and missing:
        name = missing[0]
        used = re.compile(rf"(?<![\w.]){re.escape(name)}(?![\w.])")
        for line, text in zip(lines, rendered, strict=True):
            if used.search(text):
                return AssemblyError(
                    f"{line.describe()}: unknown symbol {name!r}: refer to the module's "
                    f"symbols as {{{name}}}, and define local labels as `{name}:`"
                )
    # The whole text failed; assemble line by line to find the culprit, not
    # counting lines that fail only because they use a label defined elsewhere.
    for line, text in zip(lines, rendered, strict=True):
        try:
            _ks_asm(text, address)
        except KsError as line_error:
            if line_error.errno != KS_ERR_ASM_SYMBOL_MISSING:
                return AssemblyError(f"{line.describe()}: {_reason(line_error)}")
    return AssemblyError(f"the code does not assemble: {reason}")


def _reason(error: KsError) -> str:
    message = str(error)
    message = message[:1].lower() + message[1:]
    if error.errno == KS_ERR_ASM_FIXUP_INVALID:
        message += "; is a branch target or operand out of reach?"
    return message


def _marked_instructions(
    machine: bytes, address: int, markers: Mapping[_Site, int]
) -> dict[int, int]:
    """Marker displacement -> next_ip of the instruction carrying it."""
    wanted = set(markers.values())
    found = {}
    for instruction in Decoder(64, machine, ip=address):
        if instruction.is_ip_rel_memory_operand:
            target = instruction.ip_rel_memory_address
            displacement = (target - instruction.next_ip) % _ADDRESS_LIMIT
            if displacement in wanted:
                found[displacement] = instruction.next_ip
    return found


def _verify(machine: bytes, address: int, lines: list[Line], values: Mapping[str, int]) -> None:
    """Every reference must appear, exactly, as an operand value in the
    decoded output: otherwise keystone truncated it."""
    needed = Counter(_line_values(lines, values))
    present = _operand_values(machine, address)
    for value, count in needed.items():
        if present[value] >= count:
            continue
        # Name the line at fault: among those using the value, the first one
        # that, assembled alone, does not carry it.
        # RIP-relative uses are exact by construction, so only others are suspect.
        suspects = [line for line in lines if value in _line_values([line], values, rip=False)]
        culprit = suspects[0] if suspects else lines[0]
        for line in suspects:
            text = _render(line, values, defaultdict(int))
            try:
                alone = _operand_values(_ks_asm(text, address), address)
            except KsError:
                continue
            if alone[value] < _line_values([line], values, rip=False).count(value):
                culprit = line
                break
        location = next(
            piece.location
            for piece in culprit.pieces
            if isinstance(piece, Reference) and values[piece.location] == value
        )
        raise AssemblyError(
            f"{culprit.describe()}: {_named(location, values)} does not fit where it "
            f"is used and would be silently truncated; {_REFERENCE_USES}"
        )


def _line_values(lines: list[Line], values: Mapping[str, int], rip: bool = True) -> list[int]:
    return [
        values[piece.location]
        for line in lines
        for piece in line.pieces
        if isinstance(piece, Reference) and (rip or not piece.rip)
    ]


def _operand_values(machine: bytes, address: int) -> Counter[int]:
    """Branch targets, immediates and memory addresses of decoded code."""
    present: Counter[int] = Counter()
    for instruction in Decoder(64, machine, ip=address):
        for operand in range(instruction.op_count):
            kind = instruction.op_kind(operand)
            if kind in _BRANCH_KINDS:
                present[instruction.near_branch_target] += 1
            elif kind in IMMEDIATE_KINDS:
                present[instruction.immediate(operand)] += 1
            elif kind == OpKind.MEMORY:
                present[instruction.memory_displacement] += 1
    return present
