"""`explore`: the functions of a module, and one function in detail, for finding a site.

Everything here returns plain data (dataclasses, then dicts for --json); the
CLI renders it. Site validity is `plan_site`'s own answer, so what `show`
marks valid is exactly what `build` accepts with `check_branches` on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from micropatch.errors import SiteError
from micropatch.tools.analysis import CALL_KINDS, Caller, ModuleAnalysis, Reference
from micropatch.tools.functions import Function
from micropatch.tools.insn import near_branch_target, plan_site

HINT_STRINGS = 3
HINT_IMPORTS = 5
# plan_site decodes the whole function for every candidate: in a function longer
# than this, only the instructions around the asked offset are checked.
SITE_CHECK_LIMIT = 1500
SITE_WINDOW = 200


@dataclass(frozen=True)
class FunctionEntry:
    """One line of `explore functions`; the hint only for unnamed functions."""

    function: Function
    strings: tuple[str, ...] = ()
    imports: tuple[str, ...] = ()

    def as_json(self) -> dict[str, object]:
        f = self.function
        entry: dict[str, object] = {
            "start": f.start,
            "end": f.end,
            "size": f.size,
            "name": f.name,
            "aliases": list(f.aliases),
            "source": f.source,
        }
        if f.name is None:
            entry["hint"] = {"strings": list(self.strings), "imports": list(self.imports)}
        return entry


def list_entries(index: ModuleAnalysis) -> list[FunctionEntry]:
    """Every function, with a hint when unnamed: the strings it uses that fewest
    other functions use (the telling ones first), and the imports it uses."""
    analyses = index.analyses()
    users: Counter[str] = Counter()
    for analysis in analyses:
        users.update(set(analysis.strings))
    entries = []
    for analysis in analyses:
        function = analysis.function
        if function.name is not None:
            entries.append(FunctionEntry(function))
            continue
        strings = sorted(_distinct(analysis.strings), key=lambda s: (users[s], -len(s)))
        entries.append(
            FunctionEntry(
                function,
                tuple(strings[:HINT_STRINGS]),
                tuple(_distinct(analysis.imports)[:HINT_IMPORTS]),
            )
        )
    return entries


@dataclass(frozen=True)
class SiteAnswer:
    """Whether a site may start at one instruction: its bytes if so, why not if not.

    `checked` is False where the function is too long to check every instruction.
    """

    checked: bool
    valid: bool
    length: int = 0
    expect: str = ""
    reason: str = ""
    kind: str = ""

    def as_json(self) -> dict[str, object]:
        if not self.checked:
            return {"checked": False}
        if self.valid:
            return {"checked": True, "valid": True, "length": self.length, "expect": self.expect}
        return {"checked": True, "valid": False, "kind": self.kind, "reason": self.reason}


@dataclass(frozen=True)
class Line:
    """One instruction of `show`."""

    offset: int
    raw: bytes
    text: str
    branch_target: bool
    site: SiteAnswer
    references: tuple[Reference, ...]
    jump: int | None

    def as_json(self) -> dict[str, object]:
        return {
            "offset": self.offset,
            "bytes": self.raw.hex(" "),
            "text": self.text,
            "branch_target": self.branch_target,
            "jump": self.jump,
            "site": self.site.as_json(),
            "references": [_reference_json(r) for r in self.references],
        }


@dataclass(frozen=True)
class Shown:
    """`explore show`: a function, its neighbours in the call graph, its listing."""

    function: Function
    asked: int
    callers: list[Caller]
    references: tuple[Reference, ...]
    lines: list[Line] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "function": FunctionEntry(self.function).as_json(),
            "asked": self.asked,
            "callers": [
                {"function": f.start, "name": f.name, "call_site": ip, "through": through}
                for f, ip, through in self.callers
            ],
            "callees": [_reference_json(r) for r in self.references if r.kind in CALL_KINDS],
            "strings": [_reference_json(r) for r in self.references if r.kind == "string"],
            "constants": [_reference_json(r) for r in self.references if r.kind == "constant"],
            "instructions": [line.as_json() for line in self.lines],
        }


def show(index: ModuleAnalysis, what: str) -> Shown:
    """The function holding `what` (a name, `name+0xN`, `0xN` or `fn_<hex>`), in detail."""
    function, asked = index.locate(what)
    analysis = index.analyse(function)
    code = index.code(function)
    instructions = index.listing(function)
    window = _checked_window([i.ip for i, _ in instructions], asked)
    by_ip: dict[int, list[Reference]] = {}
    for reference in analysis.references:
        by_ip.setdefault(reference.ip, []).append(reference)
    lines = []
    for position, (ins, text) in enumerate(instructions):
        start = ins.ip - function.start
        site = _site(code, function.start, ins.ip) if window[0] <= position < window[1] else None
        lines.append(
            Line(
                offset=ins.ip,
                raw=code[start : start + ins.len],
                text=text,
                branch_target=ins.ip in analysis.branch_targets,
                site=site if site is not None else SiteAnswer(checked=False, valid=False),
                references=tuple(by_ip.get(ins.ip, ())),
                jump=near_branch_target(ins),
            )
        )
    return Shown(function, asked, index.callers(function.start), analysis.references, lines)


def _checked_window(ips: list[int], asked: int) -> tuple[int, int]:
    if len(ips) <= SITE_CHECK_LIMIT:
        return 0, len(ips)
    position = next((n for n, ip in enumerate(ips) if ip >= asked), 0)
    return max(0, position - SITE_WINDOW), position + SITE_WINDOW


def _site(code: bytes, start: int, at: int) -> SiteAnswer:
    try:
        site = plan_site(code, start, at)
    except SiteError as exc:
        return SiteAnswer(checked=True, valid=False, reason=str(exc), kind=type(exc).__name__)
    return SiteAnswer(checked=True, valid=True, length=site.length, expect=site.original.hex(" "))


def _reference_json(reference: Reference) -> dict[str, object]:
    return {
        "ip": reference.ip,
        "kind": reference.kind,
        "target": reference.target,
        "name": reference.name,
    }


def _distinct(items: list[str]) -> list[str]:
    return list(dict.fromkeys(items))
