"""`[frame+N]`, and the rules a body's use of the stack must follow where it runs.

`[frame+N]` in a body is the function's `[rsp+N]` at the site, whatever the
body has pushed and however far below the red zone the engine runs it. The
assembler writes each one as `[rsp + N + step + depth]`, where `step` is how far
below the function's rsp the body starts (the red zone, or 0) and `depth` how
much the body has pushed by then, which `arch.x86_64.stack.trace` follows
through the body's control flow: first with a marker displacement that finds
the instruction again, then with the real one, checked once more in the
final code.

`check_stack` then holds the final code to these rules (docs/patch-format.md,
"The body's view of the stack"), each refusal naming the instruction:

- rsp is back where the body found it when it falls through its end, and at
  the function's rsp when it jumps out (or at the return address, from the
  CFA, for a `ret`);
- a body run below the red zone names the function's stack with `[frame+N]`
  only: an rsp-based operand (or one through a register copied from rsp)
  outside what the body itself has pushed (at or above its entry rsp, below its
  current rsp, or at an unknown depth) would not mean what it says;
- no store at or above the function's return address, where .eh_frame's CFA
  (or a function's entry) says it is;
- no store through rsp whose slot cannot be known (an index register).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from micropatch.arch.x86_64.stack import Access, Exit, StackTrace
from micropatch.errors import AssemblyError, StackError

MARKER = 0x20000000  # the first marker displacement: far from any a person writes
MARKER_STEP = 0x100000
MARKER_SPAN = 0x80000  # |N| in [frame+N] must stay below this (512 KiB)
MAX_FRAMES = 256

_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_FRAME = re.compile(r"\bframe\b", re.IGNORECASE)


@dataclass(frozen=True)
class StackContext:
    """Where a body runs, for the frame rewriting and `check_stack`.

    `step`: how far below the function's rsp at the site the body starts (the
    red zone the engine steps over, or 0). `return_slot`: the function's return
    address is its `[rsp+return_slot]` at the site (0 at a function's entry,
    else from .eh_frame's CFA), None if unknown; `rbp_return_slot` likewise as
    `[rbp+N]` when the CFA is based on rbp. `cfa`: the CFA rule, for messages.
    `located`: False when a body is checked without its module (where it runs
    is not known: only the rules that hold everywhere apply).
    """

    step: int = 0
    return_slot: int | None = None
    rbp_return_slot: int | None = None
    cfa: str = ""
    located: bool = True


class Frames:
    """The `[frame+N]` operands of a body's rendered lines, in order."""

    def __init__(self, texts: list[str], describe: list[str]) -> None:
        self.spans: list[tuple[int, int, int]] = []  # (line, start, end) of each [..]
        for number, text in enumerate(texts):
            inside = []
            for bracket in _BRACKETS.finditer(text):
                if _FRAME.search(bracket.group()):
                    self.spans.append((number, bracket.start(), bracket.end()))
                    inside.append((bracket.start(), bracket.end()))
            for word in _FRAME.finditer(text):
                if not any(a <= word.start() < b for a, b in inside):
                    raise AssemblyError(
                        f"{describe[number]}: `frame` stands for the function's rsp at the "
                        "site only in a memory operand: [frame+N] to read or write the "
                        "function's [rsp+N], lea r, [frame+N] for its address"
                    )
        if len(self.spans) > MAX_FRAMES:
            raise AssemblyError(f"more than {MAX_FRAMES} [frame+N] operands in one body")
        self.adjust: list[int] = [0] * len(self.spans)
        # (N, place among the rsp-based operands) of each operand the body reaches
        self.placed: list[tuple[int, int]] = []

    def __bool__(self) -> bool:
        return bool(self.spans)

    def marked(self, texts: list[str]) -> list[str]:
        """`texts` with each frame operand `[... rsp ... + marker]`."""
        return self._write(texts, [MARKER + k * MARKER_STEP for k in range(len(self.spans))])

    def adjusted(self, texts: list[str]) -> list[str]:
        """`texts` with each frame operand `[... rsp ... + step + depth]`."""
        return self._write(texts, self.adjust)

    def _write(self, texts: list[str], extra: list[int]) -> list[str]:
        """Each frame operand, in order, found again in `texts` (its RIP-relative
        displacements may differ in length from those `__init__` saw)."""
        count = iter(range(len(self.spans)))

        def rewrite(bracket: re.Match[str]) -> str:
            operand = bracket.group()
            if not _FRAME.search(operand):
                return operand
            k = next(count)
            operand = _FRAME.sub("rsp", operand)
            return f"{operand[:-1]} + {extra[k]:#x}]" if extra[k] else operand

        return [_BRACKETS.sub(rewrite, text) for text in texts]

    def place(self, found: StackTrace, step: int) -> None:
        """From the code assembled with markers: each operand's N and adjustment.

        An operand in code that never runs (a guard's branch for a condition
        known at build time) is left as `[rsp+N]`; one the walk does not reach
        while the body calls into itself or jumps indirectly is refused."""
        order = sorted(found.rsp_operands)
        self.placed = []
        for k in range(len(self.spans)):
            located = self._find(found, MARKER + k * MARKER_STEP)
            if located is None:
                if found.hidden_entries:
                    raise StackError(
                        "a [frame+N] operand is in code the body does not reach from its "
                        "start along its own branches (only by a call into the body or an "
                        "indirect jump): the stack depth is known only on the body's own "
                        f"paths (and N must stay within +-{MARKER_SPAN:#x})"
                    )
                self.adjust[k] = step
                continue
            ip, offset = located
            depth = found.depths[ip]
            if depth is None:
                raise StackError(
                    f"{_shown(found, ip)} uses [frame+N], but the body's stack depth there is "
                    f"not known: {found.why_unknown()}; keep rsp's movements straight-line "
                    "before it (pushes, pops, sub/add rsp) or restore rsp from a saved copy"
                )
            self.placed.append((offset, order.index(ip)))
            self.adjust[k] = step + depth

    @staticmethod
    def _find(found: StackTrace, marker: int) -> tuple[int, int] | None:
        for ip, displacement in found.rsp_operands.items():
            if -MARKER_SPAN <= displacement - marker < MARKER_SPAN:
                return ip, displacement - marker
        return None

    def verify(self, final: StackTrace, step: int) -> set[int]:
        """The frame operands' ips in the final code (the same rsp-based operands as
        with markers, in the same order), each proven to be the function's [rsp+N]."""
        order = sorted(final.rsp_operands)
        if len(order) <= max((position for _, position in self.placed), default=-1):
            raise StackError("the [frame+N] operands could not be found again in the final code")
        chosen = set()
        for offset, position in self.placed:
            ip = order[position]
            depth = final.depths.get(ip)
            if depth is None or final.rsp_operands[ip] != offset + step + depth:
                raise StackError(
                    f"{_shown(final, ip)}: [frame{offset:+#x}] did not come out at the "
                    "function's rsp; simplify the stack moves before it"
                )
            chosen.add(ip)
        return chosen


def check_stack(found: StackTrace, frames: set[int], where: StackContext) -> None:
    """StackError unless the final body `found` follows the rules of the module
    docstring where it runs; `frames`: the ips of its [frame+N] operands."""
    for leaving in found.exits:
        _check_exit(found, leaving, where)
    for access in found.accesses:
        _check_access(found, access, access.origin in frames, where)


def _check_access(found: StackTrace, access: Access, frame: bool, where: StackContext) -> None:
    shown = _shown(found, access.ip)
    depth = found.depths.get(access.ip)
    own = (  # in what the body itself has pushed: between its rsp and its entry rsp
        access.offset is not None and depth is not None and -depth <= access.offset < 0
    )
    if where.step and access.anchor == "rsp" and not frame and not own:
        at = (
            "at a stack depth not known here"
            if access.offset is None or depth is None
            else f"at the body's entry rsp{access.offset:+#x} (rsp is entry-{depth:#x} there)"
        )
        raise StackError(
            f"{shown} addresses the stack {at}, outside what the body has pushed; the "
            f"body pushes, calls or stores below rsp, so the engine runs it {where.step} "
            "bytes below the function's rsp to spare the red zone of a leaf function, and "
            "an rsp-based operand there is not the function's: write the function's "
            "[rsp+N] as [frame+N]"
        )
    if not access.write:
        return
    if access.anchor == "rsp" and access.offset is None:
        raise StackError(
            f"{shown} stores through rsp at a slot not known here (an index register, or "
            "an unknown depth), which could be the function's return address: compute "
            "the address first and check it, or store at [frame+N]"
        )
    if access.offset is not None:
        if access.anchor == "rsp":
            offset, slot = access.offset - where.step, where.return_slot
        else:
            offset, slot = access.offset, where.rbp_return_slot
        _check_store(shown, offset, access.size, slot, access.anchor, where)


def _check_exit(found: StackTrace, leaving: Exit, where: StackContext) -> None:
    shown, depth, kind = _shown(found, leaving.ip), leaving.depth, leaving.kind
    if depth is None:
        raise StackError(
            f"{shown} leaves the body, and rsp there cannot be proven restored: "
            f"{found.why_unknown()}"
        )
    if kind == "end" and depth != 0:
        raise StackError(
            f"the body ends ({shown}) with rsp {_moved(depth)} where it started: pop what "
            "it pushes, add back what it subtracts"
        )
    if kind == "jump" and depth != -where.step:
        raise StackError(
            f"{shown} leaves the body with rsp {_moved(depth + where.step)} the function's "
            f"rsp at the site (the body runs {where.step} bytes below it): restore it "
            "first, with `lea rsp, [frame]` once its own pushes are popped"
        )
    if kind != "return":
        return
    rsp = -(depth + where.step)  # rsp is the function's rsp + this
    if where.return_slot is None:
        if where.located:
            raise StackError(
                f"{shown} returns, but where the return address is cannot be known here "
                "(no .eh_frame CFA covers the site, and it is not a function's entry)"
            )
        return
    if rsp != where.return_slot:
        raise StackError(
            f"{shown} returns with rsp at the function's [rsp{rsp:+#x}], but its return "
            f"address is at [rsp{where.return_slot:+#x}] (CFA = {where.cfa}): pop or "
            "release what is above it first"
        )


def _check_store(
    shown: str, offset: int, size: int, slot: int | None, base: str, where: StackContext
) -> None:
    if slot is None or offset + size <= slot:
        return
    raise StackError(
        f"{shown} stores {size} bytes at the function's [{base}{offset:+#x}], at or above its "
        f"return address at [{base}{slot:+#x}] (CFA = {where.cfa} at the site, from "
        ".eh_frame): it would overwrite the return address or the caller's frame; "
        "store below it"
    )


def _moved(depth: int) -> str:
    return f"{depth:#x} bytes below" if depth > 0 else f"{-depth:#x} bytes above"


def _shown(found: StackTrace, ip: int) -> str:
    return f"`{found.texts.get(ip, '?')}` (body+{ip - found.start:#x})"
