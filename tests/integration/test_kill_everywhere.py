"""The patcher SIGKILLed after every write it makes, then the same command run again.

`test_crash.py` kills at the named steps; here every write of every stop is a
kill point (`Transaction.write` counts them: "write-N" in the stop of all
threads, "lone-write-N" where one thread is borrowed to map a cave), plus the
remote system calls' own points, for apply into a new and an existing cave,
update, and removal with and without the cave's unmap. After each kill the
target must be alive, no thread stopped, its registry must never lie (an
`applied` patch has every jump in place and its trampolines intact; an
interrupted one holds at each site its original bytes or its jump), its
behaviour must be what the registry says, and the *same command* run again
must succeed and leave what it asked for (issue 20: "the next `remove` failed
instead of repairing"). Recovery is then itself killed at each of its writes.

The patcher runs in a forked child of the test process, so that each of the
hundreds of kills costs a fork, not an interpreter start.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from targets.harness import Target, Targets

from micropatch import faults, live
from micropatch.errors import AlreadyApplied, NotApplied
from micropatch.live.cave import read_caves
from micropatch.live.registry import APPLIED
from micropatch.process.maps import read_maps
from micropatch.process.memory import Memory
from micropatch.trust.admission import Admitted

from .patching import assert_untouched, make_patch

FIX_A = {"at": "check_a", "code": "add edi, 1"}
FIX_B = {"at": "check_b", "code": "add edi, 1"}
FIX_A2 = {"at": "check_a", "code": "add edi, 2"}
OTHER = {"at": "check_b+0x7", "code": "add eax, 8"}  # keeps a cave in use
SYSCALL_POINTS = ("syscall-borrowed", "syscall-entered", "memfd-created", "cave-mapped")
# What `a 5` and `b 5` answer: unpatched, the two-site fix v1, the update v2.
UNPATCHED, V1, V2 = ("1005", "32"), ("1006", "39"), ("1007", "39")
MAX_POINTS = 40  # more writes than any of these operations makes


def kill_at(point: str, op: Callable[[], object]) -> str:
    """Run `op` in a forked child told to SIGKILL itself at `point`: "killed", "done"
    (it never reached the point), or the error it raised."""
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        os.close(read)
        code = 0
        try:
            os.environ.update(faults.environment(point))
            op()
        except BaseException:
            os.write(write, traceback.format_exc().encode())
            code = 1
        os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        error = f.read().decode()
    _, status = os.waitpid(child, 0)
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    return error or "done"


@dataclass(frozen=True)
class Scenario:
    name: str
    setup: Callable[[Targets, int], object]
    op: Callable[[Targets, int], object]
    after: tuple[str, str]  # what the target answers once the op succeeded
    before: tuple[str, str]  # and before it
    points: tuple[str, ...] = ()  # named points besides the writes


def v1(tg: Targets) -> Admitted:
    return make_patch(tg.twofuncs, [FIX_A, FIX_B])


SCENARIOS = [
    Scenario(
        "apply-new-cave", lambda tg, pid: None, lambda tg, pid: live.apply(v1(tg), pid),
        V1, UNPATCHED, (*SYSCALL_POINTS, *(f"lone-write-{n}" for n in (1, 2))),
    ),
    Scenario(
        "apply-existing-cave",
        lambda tg, pid: live.apply(make_patch(tg.twofuncs, [OTHER], id="other"), pid),
        lambda tg, pid: live.apply(make_patch(tg.twofuncs, [FIX_A], id="fix-a"), pid),
        ("1006", "40"), ("1005", "40"),
    ),
    Scenario(
        "update", lambda tg, pid: live.apply(v1(tg), pid),
        lambda tg, pid: live.update(make_patch(tg.twofuncs, [FIX_A2, FIX_B], version=2), pid),
        V2, V1,
    ),
    Scenario(
        "remove-cave-kept",
        lambda tg, pid: (
            live.apply(make_patch(tg.twofuncs, [OTHER], id="other"), pid),
            live.apply(v1(tg), pid),
        ),
        lambda tg, pid: live.remove("test-fix", pid), ("1005", "40"), ("1006", "47"),
    ),
    Scenario(
        "remove-last", lambda tg, pid: live.apply(v1(tg), pid),
        lambda tg, pid: live.remove("test-fix", pid), UNPATCHED, V1,
        ("syscall-borrowed", "syscall-entered", "cave-unmapped"),
    ),
]  # fmt: skip


def points(s: Scenario) -> Iterator[str]:
    yield from s.points
    yield from (f"write-{n}" for n in range(1, MAX_POINTS))


def no_thread_stopped(pid: int) -> None:
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        assert stat.rsplit(")", 1)[1].split()[0] not in ("t", "T"), f"thread {tid} stopped"


def registry_tells_the_truth(pid: int) -> dict[str, str]:
    """Each patch's state, checked against the bytes: `applied` has every jump and its
    trampolines intact; `applying`/`removing` hold at each site its original bytes or
    a jump the registry records."""
    states = {}
    with Memory(pid, writable=False) as memory:
        caves = read_caves(memory, read_maps(pid))
        jumps = {(s.address, s.jump) for c in caves for p in c.registry.patches for s in p.sites}
        for cave in caves:
            for patch in cave.registry.patches:
                states[f"{patch.id} v{patch.version}"] = patch.state
                for site in patch.sites:
                    found = memory.read(site.address, len(site.jump))
                    if patch.state == APPLIED:
                        assert found == site.jump, f"{patch.id} applied, {site.address:#x} not"
                        code = memory.read(site.trampoline, site.trampoline_size)
                        assert f"{zlib.crc32(code):08x}" == site.code_hash, patch.id
                    else:
                        assert found == site.original or (site.address, found) in jumps
    return states


def behaves_as_registered(t: Target, states: dict[str, str], s: Scenario) -> None:
    """Interrupted: the answers before or after (or, for two sites, one of each);
    otherwise exactly what the applied patches make."""
    answers = (t.cmd("a 5"), t.cmd("b 5"))
    if all(state == APPLIED for state in states.values()):
        expected = {
            frozenset(): UNPATCHED,
            frozenset({"test-fix v1"}): V1,
            frozenset({"test-fix v2"}): V2,
            frozenset({"other v1"}): ("1005", "40"),
            frozenset({"other v1", "fix-a v1"}): ("1006", "40"),
            frozenset({"other v1", "test-fix v1"}): ("1006", "47"),
        }[frozenset(states)]
        assert answers == expected, (states, answers)
    else:
        assert {answers[0]} <= {s.before[0], s.after[0]}, (states, answers)
        assert {answers[1]} <= {s.before[1], s.after[1]}, (states, answers)


def check_and_finish(targets: Targets, t: Target, s: Scenario, said: str) -> None:
    """After a kill: the invariants, then the same command succeeds and leaves what it
    asked for; then everything is removed and the process is as it was born."""
    assert t.alive(), said
    no_thread_stopped(t.pid)
    states = registry_tells_the_truth(t.pid)
    behaves_as_registered(t, states, s)
    done = all(state == APPLIED for state in states.values())
    done = done and (t.cmd("a 5"), t.cmd("b 5")) == s.after
    try:
        s.op(targets, t.pid)
    except (AlreadyApplied, NotApplied):
        # Only if the killed command had finished: it was killed after its last write.
        assert done, f"{said}: the command again failed instead of repairing"
    assert (t.cmd("a 5"), t.cmd("b 5")) == s.after, said
    assert all(state == APPLIED for state in registry_tells_the_truth(t.pid).values())
    for patch in live.status(t.pid):
        live.remove(patch.patch_id, t.pid)
    live.repair(t.pid)
    assert_untouched(targets, "twofuncs", t.pid, ["check_a", "check_b"])


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_killed_after_every_write(targets, start, scenario):
    kills = 0
    for point in points(scenario):
        t = start("twofuncs")
        scenario.setup(targets, t.pid)
        said = kill_at(point, lambda t=t: scenario.op(targets, t.pid))
        if said == "done" and point.startswith("write-"):
            assert kills >= 3, f"only {kills} kill points reached"
            t.close()
            return
        if said == "done":  # a named point this operation does not pass
            t.close()
            continue
        assert said == "killed", said
        check_and_finish(targets, t, scenario, f"{point}: {said}")
        kills += said == "killed"
        t.close()
    pytest.fail(f"{scenario.name} makes more than {MAX_POINTS} writes")


@pytest.mark.parametrize("scenario", SCENARIOS[:3] + SCENARIOS[4:], ids=lambda s: s.name)
def test_recovery_killed_after_every_write(targets, start, scenario):
    """The command killed once after its intent is recorded, then again, run anew,
    after each write of its recovery; then once more, which completes."""
    # after the intent and one jump (or one site restored): an interrupted operation
    first = {"apply-existing-cave": "write-3", "remove-last": "write-2"}.get(
        scenario.name, "write-4"
    )
    for n in range(1, MAX_POINTS):
        t = start("twofuncs")
        scenario.setup(targets, t.pid)
        assert kill_at(first, lambda t=t: scenario.op(targets, t.pid)) == "killed"
        said = kill_at(f"write-{n}", lambda t=t: scenario.op(targets, t.pid))
        if said == "done":
            assert n > 1, "recovery was never killed"
            t.close()
            return
        assert said == "killed", said
        check_and_finish(targets, t, scenario, f"{first}, then write-{n}")
        t.close()
    pytest.fail(f"{scenario.name}: more than {MAX_POINTS} writes")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
