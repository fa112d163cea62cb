"""Rollback of a transaction that fails after it has written, at every write and step.

`live/engine.py` `_transact` writes through `Transaction.write` in the order of
`live/commit.py` (apply: trampolines, registry `applying`, thread moves, jumps,
registry `applied`; remove: registry `removing`, original bytes, registry with the
patch retired), then `commit.finish` frees retired trampolines no thread is in
(one more registry write), verifies, and unmaps an emptied cave last. A first cave
is provisioned before the stop (`live/provision.py`: its empty registry, verified). Here the
real operation runs on a real target with two patchlets, and our own code fails
it right after its Nth write (the write itself happens), or at the verify, move
or unmap step: the error must propagate and the target must be left exactly as
it was, and a following normal operation must succeed.

The positions are listed per scenario so that each is its own test id; the
`test_positions_cover_every_step` tests record the writes (by what they write)
and steps of the real operation in order, so a change in the engine's order
fails there rather than leaving positions untested.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from targets.harness import Target, Targets

from micropatch import live
from micropatch.errors import RemoteSyscallError
from micropatch.live import commit, provision
from micropatch.live.cave import read_caves
from micropatch.live.mapped import CAVE_PREFIX
from micropatch.live.registry import LAYOUT, REGISTRY_SIZE
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


def stuck(t: Target) -> int:
    """Park the workers and block a thread in stuck_read; its tid."""
    assert t.cmd("park") == "parked 1"
    answer = t.cmd("stick")
    assert answer.startswith("stuck "), answer
    return int(answer.split()[1])


@dataclass(frozen=True)
class Scenario:
    name: str
    program: tuple[str, ...]
    setup: Callable[[Targets, Target], object]
    op: Callable[[Targets, int], live.Outcome]
    probes: tuple[str, ...]  # commands whose answers the failed operation must not change
    after: tuple[str, ...]  # their answers once the operation succeeds
    # What the real operation does, in order: writes of a "trampoline", "counter",
    # "registry" slot or "site" (jump or original bytes), and the steps "move" (one
    # thread), "verify", "unmap".
    events: tuple[str, ...]

    @property
    def functions(self) -> list[str]:
        return ["stuck_read", "hot"] if self.program[0] == "spinner" else ["check_a", "check_b"]


WRITES = ("trampoline", "counter", "registry", "site")
TWO = ("a 5", "b 5")
T, R, S = "trampoline", "registry", "site"
SCENARIOS = [
    # no cave before: one is provisioned with an empty registry (one thread stopped),
    # then trampolines, registry `applying`, jumps one by one, registry `applied`
    Scenario(
        "apply-new-cave", ("twofuncs",), lambda tg, t: None,
        lambda tg, pid: live.apply(two(tg), pid), TWO, ("1006", "39"),
        (R, "verify", T, T, R, S, S, R, "verify"),
    ),
    # the same writes into the cave of another patch
    Scenario(
        "apply-existing-cave", ("twofuncs",), lambda tg, t: live.apply(base(tg), t.pid),
        lambda tg, pid: live.apply(two(tg), pid), TWO, ("1006", "47"),
        (T, T, R, S, S, R, "verify"),
    ),
    # new trampolines, registry (old `removing`, new `applying`), each old jump replaced
    # in place by the new one (no site is ever unpatched), registry (old retired); the
    # cave is in use and not crowded: reclaim leaves the retired trampolines for later
    Scenario(
        "update", ("twofuncs",), lambda tg, t: live.apply(two(tg), t.pid),
        lambda tg, pid: live.update(two(tg, "add edi, 2", 2), pid), TWO, ("1007", "46"),
        (T, T, R, S, S, R, "verify"),
    ),
    # registry `removing`, two sites restored, registry (retired); the stack scan frees
    # the trampolines and, the cave being empty, no registry is written; the cave is
    # unmapped after the stop (live.provision.release)
    Scenario(
        "remove-last", ("twofuncs",), lambda tg, t: live.apply(two(tg), t.pid),
        lambda tg, pid: live.remove("test-fix", pid), TWO, ("1005", "32"),
        (R, S, S, R, "verify", "unmap"),
    ),
    # the same, but the other patch stays: the retired trampolines wait for later
    Scenario(
        "remove-shared", ("twofuncs",),
        lambda tg, t: (live.apply(base(tg), t.pid), live.apply(two(tg), t.pid)),
        lambda tg, pid: live.remove("test-fix", pid), TWO, ("1005", "40"),
        (R, S, S, R, "verify"),
    ),
    # a thread blocked in stuck_read is moved into the relocated copy before the jumps
    Scenario(
        "apply-moving-a-thread", ("spinner", "1"), lambda tg, t: stuck(t),
        lambda tg, pid: live.apply(spin(tg), pid), ("call 5",), ("19",),
        (R, "verify", T, T, R, "move", S, S, R, "verify"),
    ),
    # removal moves no thread: the one in stuck_read's copy stays there, and reclaim
    # keeps that retired trampoline (registry) and so the cave
    Scenario(
        "remove-thread-in-copy", ("spinner", "1"),
        lambda tg, t: (stuck(t), live.apply(spin(tg), t.pid)),
        lambda tg, pid: live.remove("spin-fix", pid), ("call 5",), ("16",),
        (R, S, S, R, R, "verify"),
    ),
]  # fmt: skip


def positions(s: Scenario) -> list[str]:
    writes = sum(e in WRITES for e in s.events)
    steps = [e for e in s.events if e not in WRITES]
    return [f"write{n}" for n in range(1, writes + 1)] + steps


CASES = [pytest.param(s, p, id=f"{s.name}-{p}") for s in SCENARIOS for p in positions(s)]


@contextmanager
def injected(position: str) -> Iterator[None]:
    """Fail the next operation at `position`: after the Nth real write ("writeN"),
    after the real read-back ("verify") or thread moves ("move"), or the unmap of a
    cave left empty, after the stop ("unmap")."""
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
            real_move = commit.move_threads

            def move(tx: Transaction, pending: list, layouts: list) -> None:
                real_move(tx, pending, layouts)
                if pending:  # fail only where a thread really moved
                    raise InjectedFault(position)

            mp.setattr(commit, "move_threads", move)
        else:
            assert position == "unmap"

            def unmap(*args: object) -> None:
                raise RemoteSyscallError(position)  # what a failed munmap raises

            mp.setattr(provision, "unmap_cave", unmap)
        yield


def written(pid: int, address: int) -> str:
    """What a write at `address` is: in a cave, its registry, a trampoline or a
    counter (at the end of the registry's first page); outside, a site."""
    start, end = LAYOUT.counters  # type: ignore[misc]
    for m in read_maps(pid):
        if m.path.startswith(CAVE_PREFIX) and m.start <= address < m.end:
            offset = address - (m.start - m.offset)
            if start <= offset < end:
                return "counter"
            return "registry" if offset < REGISTRY_SIZE else "trampoline"
    return "site"


@contextmanager
def recorded() -> Iterator[list[str]]:
    """Record the writes and later steps of the operations run inside, in order,
    letting them all happen."""
    events: list[str] = []
    real_write, real_verify = Transaction.write, Transaction.verify
    real_move, real_unmap = commit.move_threads, provision.unmap_cave

    def write(self: Transaction, address: int, data: bytes) -> None:
        events.append(written(self.proc.pid, address))
        real_write(self, address, data)

    def verify(self: Transaction) -> None:
        events.append("verify")
        real_verify(self)

    def move(tx: Transaction, pending: list, layouts: list) -> None:
        events.extend("move" for _ in pending)
        real_move(tx, pending, layouts)

    def unmap(*args: object) -> None:
        events.append("unmap")
        real_unmap(*args)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Transaction, "write", write)
        mp.setattr(Transaction, "verify", verify)
        mp.setattr(commit, "move_threads", move)
        mp.setattr(provision, "unmap_cave", unmap)
        yield events


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

    if position == "unmap":
        return _unmap_fails(targets, t, scenario)
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


def _unmap_fails(targets: Targets, t: Target, s: Scenario) -> None:
    """The removal is committed when the emptied cave is unmapped, after the stop: a
    failure there fails nothing; the empty cave stays until the next operation."""
    with injected("unmap"):
        outcome = s.op(targets, t.pid)
    assert outcome.action == "removed" and outcome.borrowed == 0
    assert tuple(t.cmd(c) for c in s.probes) == s.after
    assert live.status(t.pid) == [] and caves(t.pid)
    assert live.repair(t.pid) == ["freed 2 retired trampolines"]
    assert not caves(t.pid)
    finish(targets, t, s)


def finish(targets: Targets, t: Target, s: Scenario) -> None:
    """Remove whatever is applied: the functions are the file's again; the target works."""
    for patch in live.status(t.pid):
        live.remove(patch.patch_id, t.pid)
    if s.program[0] == "spinner":
        # The stuck thread still runs in stuck_read's retired copy: the cave stays.
        assert caves(t.pid), "the retired trampoline of the stuck thread was freed"
        assert t.cmd("unstick") == "unstuck 1"  # the blocked read completes normally
        reclaim(targets, t)
    assert_untouched(targets, s.program[0], t.pid, s.functions)
    assert t.cmd("quit") == "bye"


def caves(pid: int) -> list[str]:
    return [m.path for m in read_maps(pid) if m.path.startswith(CAVE_PREFIX)]


def reclaim(targets: Targets, t: Target) -> None:
    """The next operations free the retired trampolines no thread is in any more."""
    assert live.apply(spin(targets), t.pid).moved == 0
    live.remove("spin-fix", t.pid)


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_positions_cover_every_step(targets, start, scenario):
    """The real operation makes exactly the writes and steps the positions above fail,
    in the order the scenario lists them."""
    t = start(*scenario.program)
    scenario.setup(targets, t)
    with recorded() as events:
        scenario.op(targets, t.pid)
    assert tuple(events) == scenario.events
    assert tuple(t.cmd(c) for c in scenario.probes) == scenario.after
    finish(targets, t, scenario)


def pc(pid: int, tid: int) -> int:
    """The user-space pc of a thread blocked in a system call (/proc/PID/task/TID/syscall).

    Right after a stop lets it go, the thread is "running" until its interrupted read
    is restarted and blocks again (on a loaded machine, until it gets a CPU): waited for."""
    deadline = time.monotonic() + 10
    while (fields := Path(f"/proc/{pid}/task/{tid}/syscall").read_text().split())[0] == "running":
        assert time.monotonic() < deadline, "the thread never blocked in its read again"
        time.sleep(0.001)
    assert fields[0] == "0", fields  # read
    return int(fields[-1], 16)


def test_removal_leaves_a_thread_running_in_its_retired_trampoline(targets, start):
    """Removal moves no thread: one blocked in the relocated copy stays there, its
    trampoline retired and kept; its read completes and returns through the copy into
    the restored function; the next operation frees the trampoline and the cave."""
    t = start("spinner", "1")
    tid = stuck(t)
    original = pc(t.pid, tid)
    assert live.apply(spin(targets), t.pid).moved == 1
    copied = pc(t.pid, tid)
    maps = read_maps(t.pid)
    [cave] = [m for m in maps if m.path.startswith(CAVE_PREFIX) and m.contains(copied)]

    outcome = live.remove("spin-fix", t.pid)

    assert (outcome.action, outcome.moved) == ("removed", 0)
    assert pc(t.pid, tid) == copied  # not moved back to `original`
    assert live.status(t.pid) == []
    with Memory(t.pid, writable=False) as memory:
        [registry] = [c.registry for c in read_caves(memory, read_maps(t.pid))]
    assert registry.patches == []
    [kept] = registry.retired  # stuck_read's trampoline; hot's is freed
    assert kept.trampoline <= copied < kept.trampoline + kept.size
    assert cave.start <= kept.trampoline < cave.end
    assert_untouched_code(targets, t.pid)  # the functions are the file's again
    assert t.cmd("call 5") == "16"
    assert t.cmd("unstick") == "unstuck 1"  # read returned 1 through the retired copy
    assert original != copied
    reclaim(targets, t)
    assert_untouched(targets, "spinner", t.pid, ["stuck_read", "hot"])
    assert t.cmd("quit") == "bye"


def assert_untouched_code(targets: Targets, pid: int) -> None:
    path = targets.path("spinner")
    maps = read_maps(pid)
    load = next(m.start for m in maps if m.file_path == str(path.resolve()) and m.offset == 0)
    with Memory(pid, writable=False) as memory:
        for name in ("stuck_read", "hot"):
            expected = targets.code(path, name)
            assert memory.read(load + targets.symbol(path, name).offset, len(expected)) == expected
