"""Rollback of a transaction that fails after it has written, at every write and step.

`live/engine.py` `_transact` writes through `Transaction.write` (trampolines,
counters, site jumps, registry), then verifies, moves threads and unmaps emptied
caves. Here the real operation runs on a real target with two patchlets, and our
own code fails it right after its Nth write (the write itself happens), or at the
verify, move or unmap step: the error must propagate and the target must be left
exactly as it was, and a following normal operation must succeed.

The positions are listed per scenario so that each is its own test id; the
`test_positions_cover_every_step` tests count the writes and steps of the real
operation with counting wrappers, so a change in the engine's writes fails there
rather than leaving positions untested.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from targets.harness import Target, Targets

from micropatch import live
from micropatch.live import engine
from micropatch.live.transaction import Transaction
from micropatch.process.maps import read_maps
from micropatch.process.memory import Memory

from .patching import assert_untouched, make_patch


class InjectedFault(Exception):
    """Raised by this test's wrappers, never by micropatch."""


def two(targets: Targets, code: str = "add edi, 1", version: int = 1):
    at = [{"at": "check_a", "code": code}, {"at": "check_b", "code": code}]
    return make_patch(targets.twofuncs, at, version=version)


def base(targets: Targets):
    """Another patch in twofuncs' cave: check_b+0x7 is `sub eax,edi; sub eax,3`."""
    return make_patch(targets.twofuncs, [{"at": "check_b+0x7", "code": "add eax, 8"}], id="base")


def spin(targets: Targets):
    """stuck_read's site holds a blocked thread: applying moves it into the copy."""
    at = [{"at": "stuck_read", "code": "nop"}, {"at": "hot", "code": "add edi, 1"}]
    return make_patch(targets.spinner, at, id="spin-fix")


def stuck(t: Target) -> None:
    assert t.cmd("park") == "parked 1"
    assert t.cmd("stick").startswith("stuck")


@dataclass(frozen=True)
class Scenario:
    name: str
    program: tuple[str, ...]
    setup: Callable[[Targets, Target], None]
    op: Callable[[Targets, int], live.Outcome]
    probes: tuple[str, ...]  # commands whose answers the failed operation must not change
    after: tuple[str, ...]  # their answers once the operation succeeds
    writes: int  # Transaction.write calls of the operation
    steps: tuple[str, ...]  # later steps that happen: verify, move, unmap

    @property
    def functions(self) -> list[str]:
        return ["stuck_read", "hot"] if self.program[0] == "spinner" else ["check_a", "check_b"]


TWO = ("a 5", "b 5")
SCENARIOS = [
    # trampoline, trampoline, jump, jump, registry; no cave before
    Scenario(
        "apply-new-cave", ("twofuncs",), lambda tg, t: None,
        lambda tg, pid: live.apply(two(tg), pid), TWO, ("1006", "39"), 5, ("verify",),
    ),
    # the same writes into the cave of another patch
    Scenario(
        "apply-existing-cave", ("twofuncs",), lambda tg, t: live.apply(base(tg), t.pid),
        lambda tg, pid: live.apply(two(tg), pid), TWO, ("1006", "47"), 5, ("verify",),
    ),
    # restore two sites, then trampoline, trampoline, jump, jump, registry
    Scenario(
        "update", ("twofuncs",), lambda tg, t: live.apply(two(tg), t.pid),
        lambda tg, pid: live.update(two(tg, "add edi, 2", 2), pid), TWO, ("1007", "46"), 7,
        ("verify",),
    ),
    # restore two sites; the cave is emptied: no registry write, unmapped last
    Scenario(
        "remove-last", ("twofuncs",), lambda tg, t: live.apply(two(tg), t.pid),
        lambda tg, pid: live.remove("test-fix", pid), TWO, ("1005", "32"), 2, ("verify", "unmap"),
    ),
    # restore two sites, registry (the other patch stays)
    Scenario(
        "remove-shared", ("twofuncs",),
        lambda tg, t: (live.apply(base(tg), t.pid), live.apply(two(tg), t.pid)),
        lambda tg, pid: live.remove("test-fix", pid), TWO, ("1005", "40"), 3, ("verify",),
    ),
    # a thread blocked in stuck_read is moved into the relocated copy after verify
    Scenario(
        "apply-moving-a-thread", ("spinner", "1"), lambda tg, t: stuck(t),
        lambda tg, pid: live.apply(spin(tg), pid), ("call 5",), ("19",), 5, ("verify", "move"),
    ),
    # ... and back out of it on removal
    Scenario(
        "remove-moving-a-thread", ("spinner", "1"),
        lambda tg, t: (stuck(t), live.apply(spin(tg), t.pid)),
        lambda tg, pid: live.remove("spin-fix", pid), ("call 5",), ("16",), 2,
        ("verify", "move", "unmap"),
    ),
]  # fmt: skip


def positions(s: Scenario) -> list[str]:
    return [f"write{n}" for n in range(1, s.writes + 1)] + list(s.steps)


CASES = [pytest.param(s, p, id=f"{s.name}-{p}") for s in SCENARIOS for p in positions(s)]


@contextmanager
def injected(position: str) -> Iterator[None]:
    """Fail the next operation at `position`: after the Nth real write ("writeN"),
    after the real read-back ("verify") or first thread move ("move"), or just before
    the cave is unmapped ("unmap", the one step that cannot be undone)."""
    with pytest.MonkeyPatch.context() as mp:
        if position.startswith("write"):
            nth = int(position.removeprefix("write"))
            real_write = Transaction.write
            done = 0

            def write(self: Transaction, address: int, data: bytes) -> None:
                nonlocal done
                real_write(self, address, data)
                done += 1
                if done == nth:
                    raise InjectedFault(position)

            mp.setattr(Transaction, "write", write)
        elif position == "verify":
            real_verify = Transaction.verify

            def verify(self: Transaction) -> None:
                real_verify(self)
                raise InjectedFault(position)

            mp.setattr(Transaction, "verify", verify)
        elif position == "move":
            real_move = engine._move

            def move(tx: Transaction, tid: int, rip: int) -> None:
                real_move(tx, tid, rip)
                raise InjectedFault(position)

            mp.setattr(engine, "_move", move)
        else:
            assert position == "unmap"

            def unmap(*args: object) -> None:
                raise InjectedFault(position)

            mp.setattr(engine, "unmap_cave", unmap)
        yield


@contextmanager
def counted() -> Iterator[dict[str, int]]:
    """Count the writes and later steps of the operations run inside, letting them all happen."""
    counts = {"writes": 0, "verify": 0, "move": 0, "unmap": 0}
    real_write, real_verify = Transaction.write, Transaction.verify
    real_move, real_unmap = engine._move, engine.unmap_cave

    def counting(key: str, real: Callable[..., None]) -> Callable[..., None]:
        def wrapper(*args: object) -> None:
            counts[key] += 1
            real(*args)

        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Transaction, "write", counting("writes", real_write))
        mp.setattr(Transaction, "verify", counting("verify", real_verify))
        mp.setattr(engine, "_move", counting("move", real_move))
        mp.setattr(engine, "unmap_cave", counting("unmap", real_unmap))
        yield counts


@dataclass(frozen=True)
class State:
    answers: tuple[str, ...]
    status: list[live.PatchState]
    caves: list[tuple[int, int, str, bytes]]  # start, end, perms, contents
    code: dict[str, bytes]
    blocked: dict[int, str]  # tid -> /proc/PID/task/TID/syscall, for threads blocked in one


def state(targets: Targets, t: Target, s: Scenario) -> State:
    answers = tuple(t.cmd(c) for c in s.probes)
    path = targets.path(s.program[0])
    maps = read_maps(t.pid)
    load = next(m.start for m in maps if m.file_path == str(path.resolve()) and m.offset == 0)
    with Memory(t.pid, writable=False) as memory:
        caves = [
            (m.start, m.end, m.perms, memory.read(m.start, m.end - m.start))
            for m in maps
            if "micropatch" in m.path
        ]
        code = {
            name: memory.read(
                load + targets.symbol(path, name).offset, targets.symbol(path, name).size
            )
            for name in s.functions
        }
    return State(answers, live.status(t.pid), caves, code, blocked_threads(t.pid))


def blocked_threads(pid: int) -> dict[int, str]:
    """Where each thread other than the main one sits in its system call (number,
    arguments, sp, pc): a thread moved and not moved back would show another pc. The
    main thread is left out: it is between two reads of its commands for a moment."""
    found = {}
    for task in sorted(Path(f"/proc/{pid}/task").iterdir()):
        if int(task.name) != pid:
            found[int(task.name)] = (task / "syscall").read_text().strip()
    return found


@pytest.mark.parametrize(("scenario", "position"), CASES)
def test_failure_after_writes_rolls_back(targets, start, scenario, position):
    t = start(*scenario.program)
    scenario.setup(targets, t)
    before = state(targets, t, scenario)
    assert all(not s.startswith("running") for s in before.blocked.values()), before.blocked

    with injected(position), pytest.raises(InjectedFault, match=f"^{position}$"):
        scenario.op(targets, t.pid)

    assert t.alive(), t.stderr_text()
    assert state(targets, t, scenario) == before
    if not before.caves:
        assert_untouched(targets, scenario.program[0], t.pid, scenario.functions)
    outcome = scenario.op(targets, t.pid)
    assert outcome.attempts == 1
    assert tuple(t.cmd(c) for c in scenario.probes) == scenario.after
    finish(targets, t, scenario)


def finish(targets: Targets, t: Target, s: Scenario) -> None:
    """Remove whatever is applied: the functions are the file's again; the target works."""
    for patch in live.status(t.pid):
        live.remove(patch.patch_id, t.pid)
    assert_untouched(targets, s.program[0], t.pid, s.functions)
    if s.program[0] == "spinner":
        assert t.cmd("unstick") == "unstuck 1"  # the blocked read completes normally
    assert t.cmd("quit") == "bye"


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_positions_cover_every_step(targets, start, scenario):
    """The real operation makes exactly the writes and steps the positions above fail."""
    t = start(*scenario.program)
    scenario.setup(targets, t)
    with counted() as counts:
        scenario.op(targets, t.pid)
    steps = tuple(k for k in ("verify", "move", "unmap") if counts[k])
    assert (counts["writes"], steps) == (scenario.writes, scenario.steps), counts
    assert all(counts[k] == 1 for k in steps), counts
    assert tuple(t.cmd(c) for c in scenario.probes) == scenario.after
    finish(targets, t, scenario)
