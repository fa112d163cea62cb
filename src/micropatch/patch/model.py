"""The validated patch model (format v0).

Validation here is everything that can be checked without the target module:
field types, slugs, hex, location and reference syntax. Whatever passes is
safe to hand to the ELF and assembly layers.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_serializer,
    field_validator,
    model_validator,
)

from micropatch.elf.location import Location, parse_location
from micropatch.errors import PatchFormatError
from micropatch.patch.assemble import check, references

RESUME_AFTER = "after"

_SLUG = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})+")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class PatchInfo(_Model):
    """The `[patch]` table: what the patch is."""

    id: StrictStr
    version: Annotated[StrictInt, Field(ge=1)]
    title: StrictStr | None = None
    description: StrictStr | None = None

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
    build_id: StrictStr | None = None
    sha256: StrictStr | None = None

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
    """One `[[patchlet]]`: code inserted at one site."""

    at: StrictStr
    expect: bytes | None = None
    code: StrictStr
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
    def _code_assembles(cls, value: str) -> str:
        try:
            for reference in references(value):
                _check_location(reference, f"reference {{{reference}}}: ")
            check(value)
        except PatchFormatError as exc:
            raise ValueError(str(exc)) from None
        return value

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


def _check_location(value: str, context: str = "") -> str:
    try:
        parse_location(value)
    except PatchFormatError as exc:
        raise ValueError(f"{context}{exc}") from None
    return value
