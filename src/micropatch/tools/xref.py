"""`explore xref`: which functions refer to a string, a constant or a function."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from micropatch.errors import ToolError
from micropatch.tools.analysis import ModuleAnalysis, Reference
from micropatch.tools.functions import Function

QueryKind = Literal["auto", "string", "constant", "function"]

_Predicate = Callable[[Reference], bool]


@dataclass(frozen=True)
class Hit:
    """One instruction of `function` that refers to what was asked."""

    function: Function
    reference: Reference

    def as_json(self) -> dict[str, object]:
        return {
            "function": self.function.start,
            "function_end": self.function.end,
            "function_name": self.function.name,
            "ip": self.reference.ip,
            "kind": self.reference.kind,
            "target": self.reference.target,
            "name": self.reference.name,
        }


def classify_query(index: ModuleAnalysis, query: str) -> QueryKind:
    """A number is a constant, a known function or import name a function, else text."""
    try:
        int(query, 0)
    except ValueError:
        pass
    else:
        return "constant"
    imported = set(index.imports.slots.values()) | set(index.imports.stubs.values())
    if query in imported or index.named(query):
        return "function"
    return "string"


def xref(
    index: ModuleAnalysis, query: str, kind: QueryKind = "auto"
) -> tuple[QueryKind, list[Hit]]:
    """The references to `query` in every function, in address order, and how
    the query was read."""
    if kind == "auto":
        kind = classify_query(index, query)
    if kind == "constant":
        value = _number(query)
        wanted = _matches_constant(value)
    elif kind == "function":
        wanted = _matches_function(index, query)
    else:
        wanted = _matches_string(query)
    hits = [
        Hit(analysis.function, reference)
        for analysis in index.analyses()
        for reference in analysis.references
        if wanted(reference)
    ]
    return kind, hits


def _number(query: str) -> int:
    try:
        return int(query, 0)
    except ValueError:
        raise ToolError(f"{query!r} is not a number: write a constant as 0x1f or 31") from None


def _matches_constant(value: int) -> _Predicate:
    def wanted(reference: Reference) -> bool:
        if reference.kind != "constant":
            return False
        # A negative immediate (-1, sign-extended) also matches its 32- and 64-bit
        # two's complement (0xffffffff, 0xffffffffffffffff).
        target = reference.target
        if target == value or target % (1 << 64) == value:
            return True
        return target < 0 and target % (1 << 32) == value

    return wanted


def _matches_string(text: str) -> _Predicate:
    def wanted(reference: Reference) -> bool:
        return reference.kind == "string" and reference.name is not None and text in reference.name

    return wanted


def _matches_function(index: ModuleAnalysis, query: str) -> _Predicate:
    """Calls and jumps to the function, and its address taken; for an imported name,
    calls through its PLT stub or GOT slot. A library that exports a function and
    calls it through the PLT (interposable) has both, under one name."""
    imported = set(index.imports.slots.values()) | set(index.imports.stubs.values())
    local = index.named(query) if query in imported else [index.find(query)]
    start = local[0].start if len(local) == 1 else None

    def wanted(reference: Reference) -> bool:
        if reference.kind in ("import", "import-data"):
            return reference.name == query
        return reference.kind in ("call", "tailcall", "function") and reference.target == start

    return wanted
