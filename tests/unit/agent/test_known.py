"""agent/known.py: what a process carries after a pass's operations, from their
outcomes; the registries read again only when the outcomes cannot tell."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from micropatch.agent.known import Known, carried_after
from micropatch.live.engine import Outcome
from micropatch.live.states import PatchState


def stored(patch_id: str, version: int = 1) -> Any:
    target = SimpleNamespace(module="libfoo.so")
    return SimpleNamespace(
        id=patch_id, version=version, admitted=SimpleNamespace(patch=SimpleNamespace(target=target))
    )


def state(patch_id: str, version: int = 1, counters: tuple[int, ...] = ()) -> PatchState:
    return PatchState(1, "p", "/lib/libfoo.so", patch_id, version, "", 0.0, (0x10,), 0x1000,
                      0 if counters else None, counters=counters)  # fmt: skip


def outcome(patch_id: str, action: str, version: int | None, **kw: Any) -> Outcome:
    return Outcome(1, patch_id, action, version, 1, 1, 0.0001, **kw)


def test_applied_removed_and_updated_are_known_without_a_read():
    before = {"old": state("old"), "kept": state("kept", 1, (0x2000,)), "up": state("up", 1)}
    done = [
        ("apply", stored("new", 3), outcome("new", "applied", 3, counters=(0x3000, 0x3008))),
        ("apply", stored("plain"), outcome("plain", "applied", 1, counters=())),
        ("update", stored("up", 2), outcome("up", "updated", 2, counters=())),
        ("remove", stored("old"), outcome("old", "removed", None)),
    ]
    after = carried_after(before, done)
    assert after is not None
    by_id = {c.patch_id: c for c in after}
    assert set(by_id) == {"kept", "new", "plain", "up"}
    assert by_id["kept"] is before["kept"]
    assert by_id["new"] == Known("new", 3, "libfoo.so", (0x3000, 0x3008), 0)  # counters zeroed
    assert by_id["plain"].blocked is None and by_id["plain"].counters == ()
    assert by_id["up"].version == 2


def test_a_failed_operation_leaves_what_was_read():
    before = {"a": state("a")}
    assert carried_after(before, [("remove", stored("a"), False)]) == [before["a"]]


def test_what_the_outcomes_cannot_tell_is_read_again():
    before = {"a": state("a")}
    meanwhile = [("apply", stored("b"), True)]  # AlreadyApplied: changed meanwhile
    recovered = [("apply", stored("b"), outcome("b", "applied", 1, counters=(), recovered=("x",)))]
    unknown = [("apply", stored("b"), outcome("b", "applied", 1))]  # counters not known
    for done in (meanwhile, recovered, unknown):
        assert carried_after(before, done) is None  # type: ignore[arg-type]
