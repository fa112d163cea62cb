"""What a process carries after a pass's operations on it, known from their outcomes.

After it applied, updated or removed patches in a process, a pass used to read the
process's registries again (`live.status`: its maps, every cave's registry, its
counters) to remember what the process carries. The outcomes say it already: the
registries read before the operations, less what was removed, plus what was
applied with the blocked counters its registry records (`Outcome.counters`). The
registries are read again only when the outcomes cannot tell (see `carried_after`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from micropatch.live.states import PatchState

if TYPE_CHECKING:
    from micropatch.agent.store import Stored
    from micropatch.live.engine import Outcome


@dataclass(frozen=True)
class Known:
    """A patch a process carries, known from the outcome of the operation that put it
    there: what `_remember` and `_count` use of a `PatchState`."""

    patch_id: str
    version: int
    module: str
    counters: tuple[int, ...]
    blocked: int | None


Carried = PatchState | Known


def carried_after(
    applied: dict[str, PatchState], done: list[tuple[str, Stored, Outcome | bool]]
) -> list[Carried] | None:
    """What the process carries after this pass's operations, from the registries read
    before them and the operations' outcomes, without reading the registries again;
    None when only reading them can tell: one changed meanwhile (True), recovery did
    more than asked, or the counters of a patch applied are not known. An operation
    that failed (False) rolled back: the process is as read."""
    carried: dict[str, Carried] = dict(applied)
    for op, stored, outcome in done:
        if outcome is False:
            continue
        if outcome is True or outcome.recovered:
            return None
        if op == "remove":
            carried.pop(stored.id, None)
            continue
        if outcome.counters is None or outcome.version is None:
            return None
        # The transaction zeroed the new trampolines' counters: 0 blocked so far.
        carried[stored.id] = Known(
            stored.id, outcome.version, stored.admitted.patch.target.module, outcome.counters,
            0 if outcome.counters else None,
        )  # fmt: skip
    return list(carried.values())
