"""The validated patch model (format v1; every v0 source is a valid v1 source).

Validation here is everything that can be checked without the target module
and without compiling: field types, slugs, hex, CVE ids, location and
reference syntax, guard syntax, C jump indexes. Compiling and assembling the
bodies is the toolchain's (`micropatch.bodies.Toolchain.check`), which `build`
runs: validating a model never runs `cc` or the assembler, so a long-lived
agent or server can validate untrusted input cheaply and safely.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails

from micropatch.elf.location import Location, parse_location
from micropatch.errors import PatchFormatError
from micropatch.patch.asmtext import BLOCKED_REFERENCE, references
from micropatch.patch.ctext import jump_indexes
from micropatch.patch.guard import parse_then, parse_when
from micropatch.patch.view import BodyKind, body_kind, counts_blocked

RESUME_AFTER = "after"
ARCHITECTURES = ("x86_64",)

_SLUG = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# A version fits a signed 64-bit integer (SQLite's and PostgreSQL's bigint, the
# agent's database, the fleet server's schema and columns): 63 bits everywhere.
VERSION_MAX = 2**63 - 1
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")
_CVE = re.compile(r"CVE-\d{4}-\d{4,}")
_ARCH_ALIASES = frozenset({"x86-64", "amd64", "x64", "X86_64", "AMD64"})
_BODIES = ("code", "when", "c")
_BODY_HELP = "give the patchlet's body as code (assembly), when + then (a guard) or c (C)"


class FieldProblem(ValueError):
    """A problem found by a whole-table check that belongs to one field; the
    source reader names the field in the message (`patchlet[1].then: ...`)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _cve_id(value: str) -> str:
    normalized = value.strip().upper()
    if not _CVE.fullmatch(normalized):
        raise ValueError(
            f"{value!r} is not a CVE id: expected CVE-YYYY-NNNN (a year, then 4 or more digits)"
        )
    return normalized


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PatchInfo(_Model):
    """The `[patch]` table: what the patch is."""

    id: StrictStr
    version: Annotated[StrictInt, Field(ge=1, le=VERSION_MAX)]
    title: StrictStr | None = None
    description: StrictStr | None = None
    cves: tuple[Annotated[StrictStr, AfterValidator(_cve_id)], ...] = ()
    author: StrictStr | None = None

    @field_validator("cves")
    @classmethod
    def _distinct_cves(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        repeated = sorted({cve for cve in value if value.count(cve) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed more than once")
        return value

    @field_validator("id")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _SLUG.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a valid id: use 1 to 64 lowercase letters, digits, "
                "'.', '_' or '-', starting with a letter or digit"
            )
        return value


class Target(_Model):
    """The `[target]` table: the one module build the patch applies to."""

    module: StrictStr
    # Native is the default; a CPython patch (`runtime = "cpython"`) is a PythonPatch
    # (patch/python.py). Not serialized: native artifacts keep their exact content.
    runtime: Literal["native"] = Field("native", exclude=True)
    build_id: StrictStr | None = None
    sha256: StrictStr | None = None
    arch: StrictStr = "x86_64"

    @field_validator("arch")
    @classmethod
    def _supported_arch(cls, value: str) -> str:
        if value in ARCHITECTURES:
            return value
        if value in _ARCH_ALIASES:
            raise ValueError(f"write 'x86_64' (the name uname -m prints), not {value!r}")
        raise ValueError(
            f"{value!r} is not supported: micropatch patches x86-64 processes only "
            '(arch = "x86_64")'
        )

    @field_validator("module")
    @classmethod
    def _basename(cls, value: str) -> str:
        if not value or "/" in value or value in (".", "..") or not value.isprintable():
            raise ValueError(
                f"{value!r} is not a module file name: give the base name as it appears "
                "in /proc/PID/maps, without directories"
            )
        return value

    @field_validator("build_id")
    @classmethod
    def _build_id_hex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not _HEX.fullmatch(value):
            raise ValueError(
                f"{value!r} is not a build-id: expected hex digits, as printed by "
                "`readelf -n` or `file`"
            )
        return value.lower()

    @field_validator("sha256")
    @classmethod
    def _sha256_hex(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if len(value) != 64 or not _HEX.fullmatch(value):
            raise ValueError(f"{value!r} is not a SHA-256: expected 64 hex digits")
        return value.lower()

    @model_validator(mode="after")
    def _pinned(self) -> Target:
        if self.build_id is None and self.sha256 is None:
            raise ValueError(
                "at least one of build_id or sha256 is required, so the patch can only "
                "ever apply to the exact build it was written for"
            )
        return self


class Patchlet(_Model):
    """One `[[patchlet]]`: a body inserted at one site.

    The body is exactly one of `code` (assembly), `when` + `then` (a guard)
    or `c` (a C function, with the locations it may jump to in `jumps`).
    """

    at: StrictStr
    expect: bytes | None = None
    code: StrictStr | None = None
    when: StrictStr | None = None
    then: StrictStr | None = None
    c: StrictStr | None = None
    jumps: tuple[StrictStr, ...] = ()
    resume: StrictStr = RESUME_AFTER
    check_branches: StrictBool = True

    @field_validator("at")
    @classmethod
    def _at_location(cls, value: str) -> str:
        return _check_location(value)

    @field_validator("resume")
    @classmethod
    def _resume_location(cls, value: str) -> str:
        return value if value == RESUME_AFTER else _check_location(value)

    @field_validator("expect", mode="before")
    @classmethod
    def _expect_hex(cls, value: Any) -> Any:
        if value is None or isinstance(value, bytes):
            return value
        if not isinstance(value, str):
            raise ValueError('must be a string of hex bytes, e.g. "48 89 e5"')
        digits = "".join(value.split())
        if not digits:
            raise ValueError("is empty: list the original bytes, or leave expect out")
        if not _HEX.fullmatch(digits):
            raise ValueError(
                f"{value!r} is not a byte string: expected pairs of hex digits, "
                'spaces allowed (e.g. "48 89 e5")'
            )
        return bytes.fromhex(digits)

    @field_validator("code")
    @classmethod
    def _code_references(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            for reference in references(value):
                if reference != BLOCKED_REFERENCE:
                    _check_location(reference, f"reference {{{reference}}}: ")
        except PatchFormatError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("when")
    @classmethod
    def _when_parses(cls, value: str | None) -> str | None:
        if value is not None:
            _as_value_error(parse_when, value)
        return value

    @field_validator("then")
    @classmethod
    def _then_parses(cls, value: str | None) -> str | None:
        if value is not None:
            _as_value_error(parse_then, value)
        return value

    @field_validator("jumps")
    @classmethod
    def _jump_locations(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for index, location in enumerate(value):
            _check_location(location, f"[{index}]: ")
        return value

    @model_validator(mode="wrap")
    @classmethod
    def _body_missing_too(cls, data: Any, handler: ModelWrapValidatorHandler[Patchlet]) -> Patchlet:
        """When other fields are wrong and no body is given at all, say so as
        well: a misspelt `cod` is then reported with what is missing."""
        try:
            return handler(data)
        except ValidationError as exc:
            if not isinstance(data, dict) or any(key in data for key in (*_BODIES, "then")):
                raise
            errors = [
                InitErrorDetails(
                    type=e["type"], loc=e["loc"], input=e["input"], ctx=e.get("ctx", {})
                )
                for e in exc.errors()
            ]
            missing = FieldProblem("code", f"required field is missing; {_BODY_HELP}")
            errors.append(
                InitErrorDetails(type="value_error", loc=(), input=data, ctx={"error": missing})
            )
            raise ValidationError.from_exception_data(exc.title, errors) from None

    @model_validator(mode="after")
    def _one_body(self) -> Patchlet:
        given = [name for name in _BODIES if getattr(self, name) is not None]
        if not given:
            if self.then is not None:
                raise FieldProblem("when", f"required with then: the condition; {_BODY_HELP}")
            raise FieldProblem("code", f"required field is missing; {_BODY_HELP}")
        if len(given) > 1:
            listed = f"{', '.join(given[:-1])} and {given[-1]}"
            raise ValueError(
                f"{listed} are {'both' if len(given) == 2 else 'all'} given, but a patchlet has "
                "exactly one body: code (assembly), when + then (a guard), or c (C)"
            )
        if self.when is not None and self.then is None:
            raise FieldProblem(
                "then",
                "required with when: what to do when the condition holds "
                "('jump LOCATION', 'return VALUE' or 'return')",
            )
        if self.then is not None and self.when is None:
            raise FieldProblem("then", "only for guards: give the condition in when")
        if self.jumps and self.c is None:
            raise FieldProblem(
                "jumps",
                "only for c bodies; in code write {location}, in a guard 'jump LOCATION'",
            )
        if self.c is not None:
            for index in jump_indexes(self.c):
                if index >= len(self.jumps):
                    raise FieldProblem(
                        "c",
                        f"MP_JUMP({index}), but jumps lists {len(self.jumps)} "
                        f"location{'' if len(self.jumps) == 1 else 's'} (indexes start at 0)",
                    )
        return self

    @property
    def kind(self) -> BodyKind:
        """Which of the three forms the body is written in."""
        return body_kind(self.when, self.c)

    @property
    def counts_blocked(self) -> bool:
        """Whether the body records blocked events, and so needs a counter in the cave."""
        return counts_blocked(self.code, self.then, self.c)

    @field_serializer("expect")
    def _expect_text(self, value: bytes | None) -> str | None:
        return None if value is None else value.hex(" ")


class Patch(_Model):
    """A whole patch source: `[patch]`, `[target]` and one or more `[[patchlet]]`."""

    info: PatchInfo = Field(alias="patch")
    target: Target
    patchlets: tuple[Patchlet, ...] = Field(alias="patchlet")

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def version(self) -> int:
        return self.info.version

    @field_validator("patchlets")
    @classmethod
    def _not_empty(cls, value: tuple[Patchlet, ...]) -> tuple[Patchlet, ...]:
        # Here rather than min_length, which would also fire when the only
        # patchlet is invalid and add a confusing second error.
        if not value:
            raise ValueError("at least one [[patchlet]] table is required")
        return value

    @model_validator(mode="after")
    def _distinct_sites(self) -> Patch:
        seen: dict[Location, int] = {}
        for index, patchlet in enumerate(self.patchlets):
            first = seen.setdefault(parse_location(patchlet.at), index)
            if first != index:
                raise ValueError(
                    f"patchlet[{index}] and patchlet[{first}] are both at {patchlet.at!r}; "
                    "merge their code into one patchlet"
                )
        return self


def _as_value_error(parse: Callable[[str], object], value: str) -> None:
    try:
        parse(value)
    except PatchFormatError as exc:
        raise ValueError(str(exc)) from None


def _check_location(value: str, context: str = "") -> str:
    try:
        parse_location(value)
    except PatchFormatError as exc:
        raise ValueError(f"{context}{exc}") from None
    return value
