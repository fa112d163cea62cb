"""Group policies and their inheritance: pure decisions, no database.

Groups form a tree ("/", "/prod", "/prod/web"); a host belongs to one group.
Walking from the host's group up to the root:

- a patch's state is the one set for that patch by the nearest group that
  sets it; if none does, the nearest group's *default state for new patches*
  decides; if no group sets one, a patch is disabled (`FALLBACK`);
- exclusions accumulate: every exclusion of the group and of its ancestors
  applies (a child cannot lift an exclusion its parent made).

Every decision names the group that made it, so "why is this patch off on
that host" has an answer (`Effective.explain`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from micropatch.errors import ServerError

FALLBACK = "disabled"
_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def normalise_path(path: str) -> str:
    """A group path as stored: "/" or "/a/b" (no trailing slash, no empty segment);
    ServerError for anything else."""
    text = path.strip()
    if text in ("", "/"):
        return "/"
    parts = text.strip("/").split("/")
    for part in parts:
        if not _SEGMENT.fullmatch(part):
            raise ServerError(
                f"group path {path!r}: segment {part!r} must be 1 to 63 letters, digits, "
                "'.', '_' or '-', starting with a letter or digit"
            )
    return "/" + "/".join(parts)


def ancestors(path: str) -> list[str]:
    """The paths from the root down to `path`, both included: "/a/b" → ["/", "/a", "/a/b"]."""
    path = normalise_path(path)
    if path == "/":
        return ["/"]
    parts = path.strip("/").split("/")
    return ["/"] + ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def parent_of(path: str) -> str | None:
    chain = ancestors(path)
    return chain[-2] if len(chain) > 1 else None


@dataclass(frozen=True)
class Exclusion:
    kind: str  # exe (a glob) | unit | user
    value: str
    patch_id: str | None = None  # None: every patch


@dataclass(frozen=True)
class GroupPolicy:
    """What one group sets; None / empty: inherited."""

    path: str
    default_state: str | None = None
    patches: dict[str, str] = field(default_factory=dict)
    exclusions: tuple[Exclusion, ...] = ()


@dataclass(frozen=True)
class Decision:
    patch_id: str
    state: str
    decided_by: str | None  # a group path; None: the built-in fallback
    reason: str


@dataclass(frozen=True)
class Effective:
    """The policy a host in `group` follows."""

    group: str
    default_state: str
    default_decided_by: str | None
    patches: dict[str, Decision]
    exclusions: tuple[tuple[Exclusion, str], ...]  # each with the group that made it

    def state(self, patch_id: str) -> Decision:
        """The decision for any patch, one never named by a group included."""
        found = self.patches.get(patch_id)
        if found is not None:
            return found
        return Decision(
            patch_id, self.default_state, self.default_decided_by, _default_reason(self)
        )

    def explain(self, patch_ids: Iterable[str] = ()) -> dict[str, Any]:
        """The policy as JSON, each decision with the group that made it."""
        ids = sorted(set(self.patches) | set(patch_ids))
        return {
            "group": self.group,
            "default_state": {"state": self.default_state, "decided_by": self.default_decided_by},
            "patches": [
                {
                    "patch_id": d.patch_id,
                    "state": d.state,
                    "decided_by": d.decided_by,
                    "reason": d.reason,
                }
                for d in (self.state(i) for i in ids)
            ],
            "exclusions": [
                {"kind": e.kind, "value": e.value, "patch_id": e.patch_id, "decided_by": path}
                for e, path in self.exclusions
            ],
        }


def _default_reason(effective: Effective) -> str:
    if effective.default_decided_by is None:
        return f"no group sets a default state for new patches: {FALLBACK}"
    return f"default state for new patches of group {effective.default_decided_by}"


def effective(chain: Sequence[GroupPolicy]) -> Effective:
    """The policy of the last group of `chain`, which lists the groups from the root
    down to it (as `ancestors` orders their paths)."""
    if not chain:
        raise ServerError("a policy needs at least the root group")
    default_state, default_by = FALLBACK, None
    decisions: dict[str, Decision] = {}
    exclusions: list[tuple[Exclusion, str]] = []
    for group in chain:  # root first: a nearer group overwrites
        if group.default_state is not None:
            default_state, default_by = group.default_state, group.path
        for patch_id, state in group.patches.items():
            decisions[patch_id] = Decision(
                patch_id, state, group.path, f"set for this patch by group {group.path}"
            )
        exclusions.extend((e, group.path) for e in group.exclusions)
    return Effective(chain[-1].path, default_state, default_by, decisions, tuple(exclusions))
