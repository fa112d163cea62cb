"""Checks on a C patchlet's source text that need no compiler: which verdicts it
uses, and the jump indexes it names, so a model can be validated without `cc`."""

from __future__ import annotations

import re

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.S)
_JUMP_INDEX = re.compile(r"\bMP_JUMP\s*\(\s*(0[xX][0-9a-fA-F]+|[0-9]+)[uUlL]*\s*\)")


def _code_only(source: str) -> str:
    return _COMMENT.sub(" ", source)


def uses_return(source: str) -> bool:
    """Whether the C code mentions MP_RETURN (outside comments)."""
    return re.search(r"\bMP_RETURN\b", _code_only(source)) is not None


def uses_blocked(source: str) -> bool:
    """Whether the C code mentions MP_BLOCKED (outside comments)."""
    return re.search(r"\bMP_BLOCKED\b", _code_only(source)) is not None


def jump_indexes(source: str) -> list[int]:
    """The constant indexes of MP_JUMP(n) in the code, to check against `jumps`."""
    return [int(m.group(1), 0) for m in _JUMP_INDEX.finditer(_code_only(source))]
