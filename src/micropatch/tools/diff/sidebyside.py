"""`diff --show`: the changed blocks of one matched function, old and new aligned."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from micropatch.errors import ToolError
from micropatch.tools.analysis import ModuleAnalysis
from micropatch.tools.diff.match import DiffResult
from micropatch.tools.insn import is_padding

CONTEXT = 3
WIDTH = 48


@dataclass(frozen=True)
class Row:
    """One aligned line: `tag` is `=` same, `~` changed, `-` only old, `+` only new,
    `…` a gap of unchanged instructions."""

    tag: str
    old_offset: int | None
    old_text: str
    new_offset: int | None
    new_text: str

    def as_json(self) -> dict[str, object]:
        return {
            "tag": self.tag,
            "old_offset": self.old_offset,
            "old": self.old_text,
            "new_offset": self.new_offset,
            "new": self.new_text,
        }

    def render(self) -> str:
        if self.tag == "…":
            return "   …"
        old = f"{self.old_offset:8x}  {self.old_text}" if self.old_offset is not None else ""
        new = f"{self.new_offset:8x}  {self.new_text}" if self.new_offset is not None else ""
        return f"{old[: WIDTH + 10]:<{WIDTH + 10}} {self.tag} {new}"


def side_by_side(result: DiffResult, what: str) -> list[Row]:
    """Aligned rows of the changed blocks of the function `what` names in OLD
    (a name or an offset), with a few unchanged instructions around each."""
    function = result.old.find(what)
    new_start = result.pairs.get(function.start)
    if new_start is None:
        raise ToolError(
            f"{result.old.image.name}: {function.label} ({function.start:#x}) has no match in "
            f"{result.new.image.name}; `micropatch diff OLD NEW` lists the matched functions"
        )
    old_lines = _lines(result.old, function.start)
    new_lines = _lines(result.new, new_start)
    old_tokens = result.profiles_old[function.start].tokens
    new_tokens = result.profiles_new[new_start].tokens
    matcher = difflib.SequenceMatcher(None, old_tokens, new_tokens, autojunk=False)
    rows: list[Row] = []
    for group in matcher.get_grouped_opcodes(CONTEXT):
        if rows:
            rows.append(Row("…", None, "", None, ""))
        for tag, i1, i2, j1, j2 in group:
            for k in range(max(i2 - i1, j2 - j1)):
                old = old_lines[i1 + k] if i1 + k < i2 else None
                new = new_lines[j1 + k] if j1 + k < j2 else None
                mark = {"equal": "=", "replace": "~"}.get(tag, "-" if new is None else "+")
                if tag == "replace" and (old is None or new is None):
                    mark = "-" if new is None else "+"
                rows.append(
                    Row(
                        mark,
                        old[0] if old else None,
                        old[1] if old else "",
                        new[0] if new else None,
                        new[1] if new else "",
                    )
                )
    return rows


def _lines(index: ModuleAnalysis, start: int) -> list[tuple[int, str]]:
    """(offset, text) of the instructions that have tokens, in the same order."""
    function = index.at(start)
    if function is None:
        function = index.containing(start)
    return [(ins.ip, text) for ins, text in index.listing(function) if not is_padding(ins)]
