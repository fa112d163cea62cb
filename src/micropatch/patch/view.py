"""What the layers below the source read of a patch: its id, target and patchlets.

Two things have this shape: the validated model of a source (`patch.model`,
pydantic), and the patch as a verified artifact records it
(`trust.recorded`, standard library only, so that applying a signed artifact
loads no model framework). The toolchain, the planner and the engine take
either, through these protocols; `body_kind` and `counts_blocked` are the one
definition of what both derive from a body.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

BodyKind = Literal["code", "guard", "c"]


class InfoView(Protocol):
    @property
    def id(self) -> str: ...
    @property
    def version(self) -> int: ...
    @property
    def title(self) -> str | None: ...


class TargetView(Protocol):
    @property
    def module(self) -> str: ...
    @property
    def build_id(self) -> str | None: ...
    @property
    def sha256(self) -> str | None: ...
    @property
    def arch(self) -> str: ...


class PatchletView(Protocol):
    @property
    def at(self) -> str: ...
    @property
    def expect(self) -> bytes | None: ...
    @property
    def code(self) -> str | None: ...
    @property
    def when(self) -> str | None: ...
    @property
    def then(self) -> str | None: ...
    @property
    def c(self) -> str | None: ...
    @property
    def jumps(self) -> tuple[str, ...]: ...
    @property
    def resume(self) -> str: ...
    @property
    def check_branches(self) -> bool: ...
    @property
    def kind(self) -> BodyKind: ...
    @property
    def counts_blocked(self) -> bool: ...


class PatchView(Protocol):
    @property
    def info(self) -> InfoView: ...
    @property
    def target(self) -> TargetView: ...
    @property
    def patchlets(self) -> Sequence[PatchletView]: ...
    @property
    def id(self) -> str: ...
    @property
    def version(self) -> int: ...


def body_kind(when: str | None, c: str | None) -> BodyKind:
    """Which of the three forms a body is written in."""
    if when is not None:
        return "guard"
    if c is not None:
        return "c"
    return "code"


def counts_blocked(code: str | None, then: str | None, c: str | None) -> bool:
    """Whether a body records blocked events, and so needs a counter in the cave."""
    if then is not None:
        from micropatch.patch.guard import parse_then

        return parse_then(then).blocked
    if c is not None:
        from micropatch.patch.ctext import uses_blocked

        return uses_blocked(c)
    from micropatch.patch.asmtext import BLOCKED_REFERENCE, references

    return BLOCKED_REFERENCE in references(code or "")


def readings(patch: PatchView) -> list[tuple[str, object]]:
    """Everything the layers below read of a patch, as (field, value) pairs: two
    patches with equal readings are applied alike (`trust.artifact.patch_of`
    compares an artifact's recorded model with its source this way)."""
    found: list[tuple[str, object]] = [
        ("patch.id", patch.info.id),
        ("patch.version", patch.info.version),
        ("patch.title", patch.info.title),
        ("target.module", patch.target.module),
        ("target.build_id", patch.target.build_id),
        ("target.sha256", patch.target.sha256),
        ("target.arch", patch.target.arch),
        ("patchlets", len(patch.patchlets)),
    ]
    for i, p in enumerate(patch.patchlets):
        found += [
            (f"patchlet[{i}].{name}", getattr(p, name))
            for name in ("at", "expect", "code", "when", "then", "c", "resume", "check_branches")
        ]
        found.append((f"patchlet[{i}].jumps", tuple(p.jumps)))
    return found
