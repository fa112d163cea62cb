"""The artifact payload: what `build` proved, as strict, closed models.

docs/signing.md describes every field. Strict and closed: a reader of version
1 refuses what it does not know, and every field is required, so the model
dumps back to exactly what was hashed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from micropatch.trust.keys import parse_time


class _Strict(BaseModel):
    # Strict and closed: a reader of version 1 refuses what it does not know,
    # and every field is required, so the model dumps back to what was hashed.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _hex(value: str, size: int | None = None) -> str:
    if len(value) % 2 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("must be lowercase hex digits, two per byte")
    if size is not None and len(value) != 2 * size:
        raise ValueError(f"must be {2 * size} hex digits")
    return value


class PatchFacts(_Strict):
    """The patch: its source (authoritative) and the model parsed from it."""

    id: str
    version: int
    title: str | None
    source_name: str
    source: str
    model: dict[str, Any]


class ModuleFacts(_Strict):
    """The module file the patch was built and verified against."""

    name: str  # the patch's [target] module: the name matched in /proc/PID/maps
    file: str  # base name of the file given to `build`
    build_id: str | None
    sha256: str
    pie: bool  # position-independent (PIE or shared object); else loads at its own address

    @field_validator("build_id")
    @classmethod
    def _build_id(cls, value: str | None) -> str | None:
        return None if value is None else _hex(value)

    @field_validator("sha256")
    @classmethod
    def _sha256(cls, value: str) -> str:
        return _hex(value, 32)


class FieldFacts(_Strict):
    """One field of a precomputed trampoline (`arch.x86_64.template.Field`): `width`
    bytes at `offset` hold address * `address` + counter * `counter` + module base *
    `base` + `addend`, whose size class at build was `kind`."""

    offset: int = Field(ge=0)
    width: Literal[4, 8]
    address: Literal[-1, 0, 1]
    counter: Literal[-1, 0, 1]
    base: Literal[-1, 0, 1]
    addend: int = Field(ge=0, lt=1 << 64)
    kind: Literal["rel8", "rel32", "imm32", "imm64"]


class TrampolineFacts(_Strict):
    """A site's trampoline, precomputed at build (`build.precompute`): applying fills
    in its fields instead of assembling it."""

    code: str  # hex, as laid out at the template's derivation place
    fields: list[FieldFacts]
    body: list[int] = Field(min_length=2, max_length=2)  # from the trampoline's start
    copies: list[int]  # each relocated copy, then the jump back; empty: resumes elsewhere
    starts: list[int] = Field(min_length=1)  # each displaced instruction, from the site

    @field_validator("code")
    @classmethod
    def _code(cls, value: str) -> str:
        return _hex(value)


class SiteFacts(_Strict):
    """What `build` proved about one patchlet's site."""

    patchlet: int = Field(ge=0)
    at: str
    offset: int = Field(ge=0)  # module offset of the site
    length: int = Field(ge=5, le=64)  # bytes the jump overwrites: whole instructions
    original: str  # those bytes in the module file, hex
    resume: int | None = Field(ge=0)  # module offset to continue at; None: after the site
    skip_red_zone: bool  # the trampoline steps over the 128-byte red zone first
    # A C body as built (hex) and the offset of `patchlet` in it: the host that
    # applies the artifact runs these signed bytes, and needs no compiler.
    c_code: str | None = None
    c_entry: int | None = Field(default=None, ge=0)
    # Absent from artifacts built before it: their trampolines are laid out at apply.
    trampoline: TrampolineFacts | None = None

    @field_validator("original")
    @classmethod
    def _original(cls, value: str) -> str:
        return _hex(value)

    @field_validator("c_code")
    @classmethod
    def _c_code(cls, value: str | None) -> str | None:
        return None if value is None else _hex(value)

    @property
    def original_bytes(self) -> bytes:
        return bytes.fromhex(self.original)


class BuilderFacts(_Strict):
    name: str
    version: str
    built_at: str

    @field_validator("built_at")
    @classmethod
    def _time(cls, value: str) -> str:
        parse_time(value)
        return value


class Payload(_Strict):
    """Everything the id and the signatures cover."""

    format: str
    format_version: int
    patch: PatchFacts
    module: ModuleFacts
    sites: list[SiteFacts] = Field(min_length=1)
    builder: BuilderFacts

    @model_validator(mode="after")
    def _version(self) -> Payload:
        """Trampolines came with version 2: a reader of version 1 would not see them."""
        if self.format_version < 2 and any(s.trampoline is not None for s in self.sites):
            raise ValueError("precomputed trampolines (sites[].trampoline) need format_version 2")
        return self


def format_version(sites: list[SiteFacts]) -> int:
    """The oldest version that holds these sites: 2 with precomputed trampolines, else 1
    (so that micropatch from before them still reads the artifact)."""
    return 2 if any(s.trampoline is not None for s in sites) else 1
