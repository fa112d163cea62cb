"""Reading patch sources (TOML, format v1) into the validated model.

Every failure becomes one PatchFormatError that names the source, the field
(`patchlet[1].at`) and the problem in words a patch author can act on;
pydantic and tomllib messages never reach the user raw.
"""

from __future__ import annotations

import datetime
import difflib
import re
import tomllib
from pathlib import Path

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from micropatch.errors import PatchFormatError
from micropatch.files import read_bounded
from micropatch.patch.model import FieldProblem, Patch, PatchInfo, Patchlet, Target
from micropatch.patch.python import RUNTIME, PythonPatch, PythonPatchlet, PythonTarget

MAX_SOURCE = 4 << 20  # a patch source; real ones are a few KiB

_TOML_POSITION = re.compile(
    r"(?P<what>.*) \(at (?:line (?P<line>\d+), column (?P<column>\d+)|(?P<end>end of document))\)"
)

_TABLES: dict[tuple[str, ...], type[BaseModel]] = {
    (): Patch,
    ("patch",): PatchInfo,
    ("target",): Target,
    ("patchlet",): Patchlet,
}

_PYTHON_TABLES: dict[tuple[str, ...], type[BaseModel]] = {
    (): PythonPatch,
    ("patch",): PatchInfo,
    ("target",): PythonTarget,
    ("patchlet",): PythonPatchlet,
}

_EXPECTED = {
    "int_type": "an integer",
    "string_type": "a string",
    "bool_type": "true or false",
    "model_type": "a table",
    "dict_type": "a table",
    "tuple_type": "an array of tables ([[patchlet]])",
    "list_type": "an array of tables ([[patchlet]])",
}


def load_patch(path: str | Path) -> Patch:
    """Read and validate a patch source file."""
    try:
        data = read_bounded(path, MAX_SOURCE)
    except OSError as exc:
        raise PatchFormatError(f"{path}: cannot read patch source: {exc.strerror}") from None
    return parse_patch(data, str(path))


def parse_patch(text: str | bytes, source: str = "<string>") -> Patch:
    """Validate a native patch source given as text (or UTF-8 bytes); `source`
    names it in error messages. A CPython patch is refused: see `parse_source`."""
    patch = parse_source(text, source)
    if isinstance(patch, PythonPatch):
        raise PatchFormatError(
            f"{source}: a CPython patch ([target] runtime = {RUNTIME!r}), where a native patch "
            "(a module file and its machine code) is expected"
        )
    return patch


def parse_source(text: str | bytes, source: str = "<string>") -> Patch | PythonPatch:
    """Validate a patch source of either runtime, chosen by `[target] runtime`
    (native when absent)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PatchFormatError(
                f"{source}: not UTF-8 text (invalid byte at offset {exc.start}); "
                "TOML files must be UTF-8"
            ) from None
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PatchFormatError(f"{source}: {_toml_problem(exc)}") from None
    except RecursionError:
        raise PatchFormatError(f"{source}: invalid TOML: nested too deeply") from None
    target = document.get("target")
    python = isinstance(target, dict) and target.get("runtime") == RUNTIME
    model: type[Patch] | type[PythonPatch] = PythonPatch if python else Patch
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        tables = _PYTHON_TABLES if python else _TABLES
        problems = [_problem(error, tables) for error in exc.errors()]
    if len(problems) == 1:
        raise PatchFormatError(f"{source}: {problems[0]}")
    listed = "".join(f"\n  {problem}" for problem in problems)
    raise PatchFormatError(f"{source}: {len(problems)} problems:{listed}")


def _toml_problem(exc: tomllib.TOMLDecodeError) -> str:
    message = str(exc)
    match = _TOML_POSITION.fullmatch(message)
    if match is None:
        return f"invalid TOML: {message}"
    where = "the end" if match["end"] else f"line {match['line']}, column {match['column']}"
    return f"invalid TOML at {where}: {match['what'][:1].lower()}{match['what'][1:]}"


def _problem(error: ErrorDetails, tables: dict[tuple[str, ...], type[BaseModel]]) -> str:
    loc = error["loc"]
    path = _path(loc)
    kind = error["type"]
    ctx = error.get("ctx", {})
    given = error["input"]
    if loc == ("patchlet",) and kind == "missing":
        text = "at least one [[patchlet]] table is required"
    elif kind == "missing":
        text = (
            f"the [{path}] table is required"
            if loc in (("patch",), ("target",))
            else ("required field is missing")
        )
    elif kind == "extra_forbidden":
        text = "unknown field" + _suggestion(loc, tables)
    elif kind == "value_error":
        cause = ctx.get("error")
        text = str(cause if cause is not None else error["msg"])
        if isinstance(cause, FieldProblem):
            path = _path((*loc, cause.field))
    elif kind == "greater_than_equal":
        text = f"must be at least {ctx['ge']}, got {given!r}"
    elif kind == "less_than_equal":
        text = f"must be at most {ctx['le']}, got {given!r}"
    elif kind in ("tuple_type", "list_type") and loc[-1] != "patchlet":
        text = f"must be an array of strings, got {_toml_type(given)}"
    elif kind in _EXPECTED:
        text = f"must be {_EXPECTED[kind]}, got {_toml_type(given)}"
    else:
        text = error["msg"]
    return f"{path}: {text}" if path else text


def _path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else part
    return text


def _suggestion(loc: tuple[int | str, ...], tables: dict[tuple[str, ...], type[BaseModel]]) -> str:
    """The allowed field names of the table holding the unknown one, nearest
    first, so a misspelling points at its fix."""
    table = tuple(part for part in loc[:-1] if isinstance(part, str))
    model = tables.get(table)
    if model is None:
        return ""
    allowed = [field.alias or name for name, field in model.model_fields.items()]
    close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f" (allowed: {', '.join(allowed)}){hint}"


def _toml_type(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return f"the integer {value}"
    if isinstance(value, float):
        return f"the float {value}"
    if isinstance(value, str):
        shown = value if len(value) <= 40 else value[:37] + "..."
        return f"the string {shown!r}"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, datetime.date | datetime.time):
        return "a date/time"
    return type(value).__name__
