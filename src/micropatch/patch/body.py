"""A patchlet's body, whatever it is written in, as assembly for the trampoline.

The planner calls `body_source` once per site, knowing whether the site is a
function's entry, and assembles the result with `assemble` wherever the
trampoline lands. `code` is returned as written; a guard (`when` + `then`)
and a C function (`c`) are compiled to assembly that saves what it uses.

Guard and C bodies always push (the flags first), so the engine steps over
the red zone before them except at a function's entry; their generated code
counts on exactly that when it reads rsp and when it leaves by a jump.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, TypeVar

from micropatch.errors import PatchFormatError
from micropatch.patch.assemble import BLOCKED_REFERENCE, references
from micropatch.patch.cbody import c_source, compile_c, uses_blocked, uses_return
from micropatch.patch.guard import guard_source, parse_then, parse_when

if TYPE_CHECKING:
    from micropatch.patch.model import Patchlet

BodyKind = Literal["code", "guard", "c"]
_T = TypeVar("_T")


def body_kind(patchlet: Patchlet) -> BodyKind:
    """Which of the three forms the patchlet's body is written in."""
    if patchlet.when is not None:
        return "guard"
    if patchlet.c is not None:
        return "c"
    return "code"


def needs_counter(patchlet: Patchlet) -> bool:
    """Whether the body records blocked events, and so needs a counter in the cave."""
    kind = body_kind(patchlet)
    if kind == "guard":
        assert patchlet.then is not None
        return _field("then", parse_then, patchlet.then).blocked
    if kind == "c":
        assert patchlet.c is not None
        return uses_blocked(patchlet.c)
    return BLOCKED_REFERENCE in references(patchlet.code or "")


def body_source(patchlet: Patchlet, *, at_entry: bool, counter: int | None = None) -> str:
    """Assembly (with `{location}` references) for the patchlet's body.

    `at_entry`: the site is at offset 0 of a function, so `return` is possible
    and no red zone is live. `counter`: the address of the patchlet's 64-bit
    blocked-event counter, if the engine provides one. Raises PatchFormatError
    (GuardError, CCompileError) naming the field at fault.
    """
    kind = body_kind(patchlet)
    if kind == "guard":
        assert patchlet.when is not None and patchlet.then is not None
        when = _field("when", parse_when, patchlet.when)
        then = _field("then", parse_then, patchlet.then)
        return guard_source(when, then, at_entry=at_entry, counter=counter)
    if kind == "c":
        assert patchlet.c is not None
        compiled = _field("c", compile_c, patchlet.c)
        return c_source(
            compiled,
            jumps=patchlet.jumps,
            at_entry=at_entry,
            returns=uses_return(patchlet.c),
            blocked=uses_blocked(patchlet.c),
            counter=counter,
        )
    return patchlet.code or ""


def _field(name: str, parse: Callable[[str], _T], text: str) -> _T:
    try:
        return parse(text)
    except PatchFormatError as exc:
        raise type(exc)(f"{name}: {exc}") from None
