"""Pure decisions: which admitted patches a process should carry.

No I/O here (user names are resolved when an exclusion is made): the inputs
are what /proc says of the process (`ProcessInfo`), the patches that match
one of its modules, and the policy state; the output is the set of patch ids
the process should carry. Unit-tested in tests/unit/agent/test_policy.py.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from micropatch.errors import SelectionError
from micropatch.process.select import ProcessInfo, parse_user, unit_pattern

Kind = Literal["exe", "unit", "user"]
KINDS: tuple[Kind, ...] = ("exe", "unit", "user")
ENABLED, DISABLED = "enabled", "disabled"


@dataclass(frozen=True)
class Exclusion:
    """Processes a patch (or every patch: `patch_id` None) must not be applied to.

    exe: a glob on /proc/PID/exe's path; unit: a glob on the systemd unit
    (`nginx` means `nginx.service`); user: a uid (names are resolved when the
    exclusion is made, see `exclusion`)."""

    kind: Kind
    pattern: str
    patch_id: str | None = None

    def matches(self, info: ProcessInfo) -> bool:
        if self.kind == "exe":
            return bool(info.exe) and fnmatch.fnmatchcase(info.exe, self.pattern)
        if self.kind == "unit":
            return info.unit is not None and fnmatch.fnmatchcase(info.unit, self.pattern)
        return str(info.uid) == self.pattern

    def concerns(self, patch_id: str) -> bool:
        return self.patch_id is None or self.patch_id == patch_id

    def describe(self) -> str:
        what = {"exe": "--exe", "unit": "--unit", "user": "--user"}[self.kind]
        scope = f" --patch {self.patch_id}" if self.patch_id else ""
        return f"{what} {self.pattern}{scope}"


def exclusion(kind: str, value: str, patch_id: str | None = None) -> Exclusion:
    """An exclusion from the command line's words: the unit and user normalised
    (`nginx` → `nginx.service`, `nobody` → `65534`)."""
    if kind not in KINDS:
        raise SelectionError(f"unknown exclusion kind {kind!r}: use exe, unit or user")
    if not value:
        raise SelectionError(f"--{kind} needs a value")
    if kind == "unit":
        value = unit_pattern(value)
    elif kind == "user":
        value = str(parse_user(value))
    return Exclusion(kind, value, patch_id or None)


@dataclass(frozen=True)
class PolicyView:
    """A snapshot of the policy state, as the decisions read it."""

    states: Mapping[str, str] = field(default_factory=dict)  # patch id -> enabled|disabled
    exclusions: tuple[Exclusion, ...] = ()
    auto_disabled: frozenset[tuple[str, str]] = frozenset()  # (patch id, exe)
    pins: Mapping[tuple[str, int], bool] = field(default_factory=dict)  # (patch id, pid) -> want

    def enabled(self, patch_id: str) -> bool:
        return self.states.get(patch_id) == ENABLED


def reasons_against(patch_id: str, info: ProcessInfo, view: PolicyView) -> list[str]:
    """Why `patch_id` must not be on this process (empty: it should be, if it matches)."""
    reasons = []
    if not view.enabled(patch_id):
        reasons.append("disabled")
    if (patch_id, info.exe) in view.auto_disabled:
        reasons.append(f"auto-disabled for {info.exe} after crashes")
    reasons += [
        f"excluded ({e.describe()})"
        for e in view.exclusions
        if e.concerns(patch_id) and e.matches(info)
    ]
    return reasons


def wants(patch_id: str, info: ProcessInfo, view: PolicyView) -> bool:
    """Whether this process should carry this patch, given that its module matches.

    A pin (an operator's `micropatch apply|remove --pid` through the agent) wins for
    that process's lifetime; otherwise the patch must be enabled, not auto-disabled
    for the executable, and not excluded."""
    pinned = view.pins.get((patch_id, info.pid))
    if pinned is not None:
        return pinned
    return not reasons_against(patch_id, info, view)


def covers(patch_id: str, info: ProcessInfo, view: PolicyView) -> bool:
    """Whether the policy has this process in scope for this patch (what the agent
    reports to the fleet): not excluded from it, unless an operator's pin put it
    there. Disabled or not, the patch's carriers are reported as they are."""
    if view.pins.get((patch_id, info.pid)):
        return True
    return not any(e.concerns(patch_id) and e.matches(info) for e in view.exclusions)


class Identified(Protocol):
    """A module file's identity (elf.identity.ModuleIdentity has this shape)."""

    @property
    def build_id(self) -> str | None: ...

    @property
    def sha256(self) -> str: ...


class Targeted(Protocol):
    """What `matches` reads of a patch target (patch.model.Target has this shape)."""

    @property
    def build_id(self) -> str | None: ...

    @property
    def sha256(self) -> str | None: ...


def matches(target: Targeted, identity: Identified) -> bool:
    """A patch target is this module file: every identity field the patch gives agrees
    (as live.mapped.find_module checks it)."""
    if not target.build_id and not target.sha256:
        return False
    if target.build_id and (identity.build_id or "").lower() != target.build_id.lower():
        return False
    return not (target.sha256 and identity.sha256.lower() != target.sha256.lower())
