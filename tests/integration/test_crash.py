"""The patcher killed (SIGKILL, for real) between every two steps of every transaction.

Each test runs one operation in a subprocess armed to die at a point
(`micropatch.faults.environment`: MICROPATCH_FAULT and its test-only switch):
the subprocess kills itself at that `checkpoint`. The target must then be alive, with no thread left in a tracing stop, behave as
either fully patched or fully unpatched, and have a registry that says which
(or says "interrupted", which `repair` and every next command resolve); the
next commands must succeed and leave it exactly as it was.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from micropatch import faults, live
from micropatch.process.maps import read_maps
from micropatch.process.memory import Memory

from .patching import assert_untouched, make_patch, patch_source

FIX_A = {"at": "check_a", "code": "add edi, 1"}
FIX_B = {"at": "check_b", "code": "add edi, 1"}
FIX_A2 = {"at": "check_a", "code": "add edi, 2"}
UNPATCHED = ("1005", str(7 * 5 - 3))
PATCHED = ("1006", str(7 * 6 - 3))
PATCHED_V2 = ("1007", str(7 * 6 - 3))

RUNNER = """
import sys
from micropatch import live
from micropatch.trust.policy import admit
op, pid, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if op == "remove":
    live.remove(path, pid)
else:
    patch = admit(open(path, "rb").read(), name=path, keys=None, allow_unsigned=True)
    getattr(live, op)(patch, pid)
"""


def _kill_at(point: str, op: str, pid: int, arg: str) -> int:
    env = {**os.environ, **faults.environment(point)}
    done = subprocess.run(
        [sys.executable, "-c", RUNNER, op, str(pid), arg],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode


def _no_thread_stopped(pid: int) -> None:
    """Every thread runs again once its tracer is gone (ptrace stops are 't')."""
    deadline = time.monotonic() + 5
    while True:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            states.append(stat.rsplit(")", 1)[1].split()[0])
        if "t" not in states and "T" not in states:
            return
        assert time.monotonic() < deadline, f"threads still stopped: {states}"
        time.sleep(0.01)


def _behaviour(t) -> tuple[str, str]:
    return t.cmd("a 5"), t.cmd("b 5")


def _registry_agrees(pid: int) -> list[str]:
    """What the registry says, checked against the bytes: 'applied' patches have
    every jump in place; interrupted ones are reported, for repair to resolve."""
    states = live.status(pid)
    maps = read_maps(pid)
    from micropatch.live.cave import read_caves

    with Memory(pid, writable=False) as memory:
        caves = read_caves(memory, maps)
        jumps = {(s.address, s.jump) for c in caves for p in c.registry.patches for s in p.sites}
        for cave in caves:
            for patch in cave.registry.patches:
                for site in patch.sites:
                    found = memory.read(site.address, len(site.jump))
                    if patch.state == "applied":
                        assert found == site.jump, f"{patch.id} applied but {site.address:#x}"
                    else:  # interrupted: original bytes, or a jump the registry records
                        assert found == site.original or (site.address, found) in jumps
    return [f"{s.patch_id}:{s.state}" for s in states]


def _write(tmp_path: Path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(source)
    return str(path)


APPLY_NEW_CAVE = [
    "syscall-borrowed",
    "syscall-entered",
    "memfd-created",
    "cave-mapped",
    "cave-ready",
    "trampolines-written",
    "intent-recorded",
    "jump-0-written",
    "jump-1-written",
    "committed",
]


@pytest.mark.parametrize("point", APPLY_NEW_CAVE)
def test_apply_killed(targets, start, tmp_path, point):
    t = start("twofuncs")
    source = _write(tmp_path, "fix.toml", patch_source(targets.twofuncs, [FIX_A, FIX_B]))
    assert _kill_at(point, "apply", t.pid, source) == -signal.SIGKILL
    assert t.proc.poll() is None
    _no_thread_stopped(t.pid)
    said = _registry_agrees(t.pid)
    assert _behaviour(t) in (UNPATCHED, PATCHED, ("1006", UNPATCHED[1]))
    live.repair(t.pid)
    assert all(s.state == "applied" for s in live.status(t.pid))
    now = _behaviour(t)
    assert now in (UNPATCHED, PATCHED), (said, now)
    patch = make_patch(targets.twofuncs, [FIX_A, FIX_B])
    if now == UNPATCHED:
        assert live.status(t.pid) == []
        live.apply(patch, t.pid)
    assert _behaviour(t) == PATCHED
    live.remove(patch.id, t.pid)
    assert _behaviour(t) == UNPATCHED
    assert_untouched(targets, "twofuncs", t.pid, ["check_a", "check_b"])


APPLY_EXISTING_CAVE = [
    "trampolines-written",
    "intent-recorded",
    "jump-0-written",
    "committed",
]


@pytest.mark.parametrize("point", APPLY_EXISTING_CAVE)
def test_apply_into_a_cave_killed(targets, start, tmp_path, point):
    t = start("twofuncs")
    first = make_patch(targets.twofuncs, [FIX_A], id="fix-a")
    live.apply(first, t.pid)
    source = _write(tmp_path, "b.toml", patch_source(targets.twofuncs, [FIX_B], id="fix-b"))
    assert _kill_at(point, "apply", t.pid, source) == -signal.SIGKILL
    _no_thread_stopped(t.pid)
    _registry_agrees(t.pid)
    live.repair(t.pid)
    ids = {s.patch_id for s in live.status(t.pid)}
    assert ids in ({"fix-a"}, {"fix-a", "fix-b"})
    assert _behaviour(t) == (PATCHED if ids == {"fix-a", "fix-b"} else ("1006", UNPATCHED[1]))
    for patch_id in ids:
        live.remove(patch_id, t.pid)
    assert_untouched(targets, "twofuncs", t.pid, ["check_a", "check_b"])


REMOVE = [
    "intent-recorded",
    "site-0-restored",
    "site-1-restored",
    "committed",
    "syscall-borrowed",
    "syscall-entered",
    "cave-unmapped",
]


@pytest.mark.parametrize("point", REMOVE)
def test_remove_killed(targets, start, point):
    t = start("twofuncs")
    patch = make_patch(targets.twofuncs, [FIX_A, FIX_B])
    live.apply(patch, t.pid)
    assert _kill_at(point, "remove", t.pid, patch.id) == -signal.SIGKILL
    _no_thread_stopped(t.pid)
    _registry_agrees(t.pid)
    assert _behaviour(t) in (UNPATCHED, PATCHED, (UNPATCHED[0], PATCHED[1]))
    live.repair(t.pid)
    assert live.status(t.pid) == []  # a removal, once its intent is recorded, completes
    assert _behaviour(t) == UNPATCHED
    live.apply(patch, t.pid)
    live.remove(patch.id, t.pid)
    assert_untouched(targets, "twofuncs", t.pid, ["check_a", "check_b"])


UPDATE = [
    "trampolines-written",
    "intent-recorded",
    "site-0-restored",
    "jump-0-written",
    "jump-1-written",
    "committed",
]


@pytest.mark.parametrize("point", UPDATE)
def test_update_killed(targets, start, tmp_path, point):
    t = start("twofuncs")
    v1 = make_patch(targets.twofuncs, [FIX_A], version=1)
    live.apply(v1, t.pid)
    source = _write(
        tmp_path, "v2.toml", patch_source(targets.twofuncs, [FIX_A2, FIX_B], version=2)
    )
    assert _kill_at(point, "update", t.pid, source) == -signal.SIGKILL
    _no_thread_stopped(t.pid)
    _registry_agrees(t.pid)
    live.repair(t.pid)
    [state] = live.status(t.pid) or [None]
    assert state is not None, "an interrupted update ends with one version applied"
    expected = {1: ("1006", UNPATCHED[1]), 2: PATCHED_V2}[state.version]
    assert _behaviour(t) == expected
    live.remove(state.patch_id, t.pid)
    assert_untouched(targets, "twofuncs", t.pid, ["check_a", "check_b"])


@pytest.mark.parametrize("point", ["syscall-borrowed", "syscall-entered", "cave-mapped"])
def test_thread_blocked_in_read_survives(targets, start, tmp_path, point):
    """The borrowed thread was blocked in read(): killed mid-call, its read() still
    returns what it should, not our call's result."""
    t = start("spinner", "1")
    t.cmd("park")
    assert t.cmd("stick").startswith("stuck")
    source = _write(
        tmp_path, "fix.toml", patch_source(targets.spinner, [{"at": "hot", "code": "nop"}])
    )
    assert _kill_at(point, "apply", t.pid, source) == -signal.SIGKILL
    _no_thread_stopped(t.pid)
    assert t.cmd("unstick") == "unstuck 1"
    live.repair(t.pid)
    for state in live.status(t.pid):
        live.remove(state.patch_id, t.pid)
    assert_untouched(targets, "spinner", t.pid, ["stuck_read", "hot"])
