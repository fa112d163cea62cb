"""The model of a CPython patch: `[target] runtime = "cpython"`.

The same `[patch]` table as a native patch; a `[target]` naming a module by
its `__name__` and the SHA-256 of its source file; patchlets at qualified
names (`parse_header`, `Parser.feed`) whose body is a guard (`when` a Python
expression over the parameters, `then` a `raise ...` or `return ...`,
optionally prefixed `blocked;`) or a replacement function (`python = "def
..."`). Validation parses the Python with `ast` (syntax only, in this
interpreter); compiling for the target's Python version is the build's work.
"""

from __future__ import annotations

import ast
import re
from typing import Literal

from pydantic import Field, StrictStr, field_validator, model_validator

from micropatch.patch.model import FieldProblem, PatchInfo, _Model

RUNTIME = "cpython"
BLOCKED_PREFIX = re.compile(r"\s*blocked\s*;\s*")
_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = re.compile(rf"{_IDENTIFIER}(\.{_IDENTIFIER})*")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_VERSION = re.compile(r"3\.\d{1,2}")


class PythonTarget(_Model):
    """`[target]` of a CPython patch: the module by name, its source file by hash."""

    runtime: Literal["cpython"]
    module: StrictStr
    sha256: StrictStr
    python: StrictStr | None = None  # "3.11": the version the patch is written for

    @field_validator("module")
    @classmethod
    def _dotted(cls, value: str) -> str:
        if not _DOTTED.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a module name: give its __name__ as the process imports "
                "it, dotted (e.g. 'shop.parsers'), not a file name"
            )
        return value

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, value: str) -> str:
        if not _HEX64.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a SHA-256: expected the 64 hex digits of `sha256sum` "
                "of the module's source file"
            )
        return value.lower()

    @field_validator("python")
    @classmethod
    def _version(cls, value: str | None) -> str | None:
        if value is not None and not _VERSION.fullmatch(value):
            raise ValueError(f"{value!r} is not a Python version: write major.minor, e.g. '3.11'")
        return value


class PythonPatchlet(_Model):
    """One function changed: a guard (`when` + `then`) or a replacement (`python`)."""

    at: StrictStr
    when: StrictStr | None = None
    then: StrictStr | None = None
    python: StrictStr | None = None
    expect: StrictStr | None = None  # the original code's identity (build fills it in)

    @field_validator("at")
    @classmethod
    def _qualified(cls, value: str) -> str:
        if not _DOTTED.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a qualified name: name a function of the module or a "
                "method as Class.method (nested functions cannot be patched)"
            )
        return value

    @field_validator("when")
    @classmethod
    def _expression(cls, value: str | None) -> str | None:
        if value is not None:
            _parse(value, "eval", "a Python expression over the function's parameters")
        return value

    @field_validator("then")
    @classmethod
    def _action(cls, value: str | None) -> str | None:
        if value is not None:
            then_statement(value)
        return value

    @field_validator("python")
    @classmethod
    def _function(cls, value: str | None) -> str | None:
        if value is not None:
            replacement(value)
        return value

    @field_validator("expect")
    @classmethod
    def _identity(cls, value: str | None) -> str | None:
        if value is not None and not _HEX64.fullmatch(value):
            raise ValueError("must be a code identity: 64 hex digits, as `build` prints")
        return None if value is None else value.lower()

    @model_validator(mode="after")
    def _one_body(self) -> PythonPatchlet:
        help_ = "give when + then (a guard) or python (a replacement function)"
        if self.python is not None and (self.when is not None or self.then is not None):
            raise ValueError(f"python and when/then are both given; {help_}")
        if self.python is None and self.when is None:
            if self.then is not None:
                raise FieldProblem("when", f"required with then: the condition; {help_}")
            raise FieldProblem("when", f"required field is missing; {help_}")
        if self.when is not None and self.then is None:
            raise FieldProblem(
                "then", "required with when: 'raise EXPR', 'return EXPR' or 'return'"
            )
        if self.python is not None:
            name = self.at.rpartition(".")[2]
            found = replacement(self.python).name
            if found != name:
                raise FieldProblem(
                    "python", f"defines {found}(), but the patchlet is at {self.at!r}: "
                    f"name the replacement {name}"
                )  # fmt: skip
        return self

    @property
    def kind(self) -> Literal["guard", "replacement"]:
        return "replacement" if self.python is not None else "guard"

    @property
    def counts_blocked(self) -> bool:
        return self.then is not None and BLOCKED_PREFIX.match(self.then) is not None


class PythonPatch(_Model):
    """A whole CPython patch source."""

    info: PatchInfo = Field(alias="patch")
    target: PythonTarget
    patchlets: tuple[PythonPatchlet, ...] = Field(alias="patchlet")

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def version(self) -> int:
        return self.info.version

    @field_validator("patchlets")
    @classmethod
    def _not_empty(cls, value: tuple[PythonPatchlet, ...]) -> tuple[PythonPatchlet, ...]:
        if not value:
            raise ValueError("at least one [[patchlet]] table is required")
        return value

    @model_validator(mode="after")
    def _distinct(self) -> PythonPatch:
        seen: dict[str, int] = {}
        for index, patchlet in enumerate(self.patchlets):
            first = seen.setdefault(patchlet.at, index)
            if first != index:
                raise ValueError(
                    f"patchlet[{index}] and patchlet[{first}] both change {patchlet.at!r}; "
                    "merge them into one patchlet"
                )
        return self


def then_statement(text: str) -> ast.Raise | ast.Return:
    """The `raise`/`return` statement of a `then`, without its `blocked;` prefix."""
    body = BLOCKED_PREFIX.sub("", text, count=1) if BLOCKED_PREFIX.match(text) else text
    tree = _parse(body, "exec", "'raise EXPR', 'return EXPR' or 'return'")
    assert isinstance(tree, ast.Module)
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Raise | ast.Return):
        raise ValueError(
            f"{text!r}: a guard's action is one statement, 'raise EXPR', 'return EXPR' or "
            "'return', optionally after 'blocked;' (counts the attempt)"
        )
    return tree.body[0]


def replacement(text: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    """The one function a `python` replacement defines."""
    tree = _parse(text, "exec", "a function definition: def name(same parameters): ...")
    assert isinstance(tree, ast.Module)
    functions = [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    if len(tree.body) != 1 or len(functions) != 1:
        raise ValueError(
            "a replacement is exactly one function definition (def name(...): ...) and "
            "nothing else; its decorators are ignored"
        )
    return functions[0]


def _parse(text: str, mode: Literal["eval", "exec"], what: str) -> ast.AST:
    try:
        return ast.parse(text, mode=mode)
    except SyntaxError as exc:
        raise ValueError(f"{text!r} is not {what}: {exc.msg} (column {exc.offset})") from None
    except (ValueError, RecursionError, MemoryError) as exc:
        raise ValueError(f"{text!r} is not {what}: {exc}") from None
