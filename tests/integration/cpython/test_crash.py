"""The patcher SIGKILLed (for real) at every checkpoint of a CPython operation:
the interpreter keeps running, with the patch fully in force or not at all, its
page saying which; the next operations succeed and restore the original code."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from micropatch import faults
from micropatch.runtimes.cpython import engine, states

from .conftest import StartPy, make_py_patch
from .test_live import BLOCKED_LONG, LONG, ORIGINAL_LONG

POINTS = ["py-memfd-created", "py-page-mapped", "py-page-ready", "py-operation-written",
          "py-armed", "py-hijacked", "py-queued", "py-resumed"]  # fmt: skip

RUNNER = """
import sys
from micropatch.runtimes.cpython import engine
from micropatch.trust.admission import admit_any
op, pid, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if op == "remove":
    engine.remove(path, pid)
else:
    data = open(path, "rb").read()
    patch = admit_any(data, name=path, keys=None, allow_unsigned=True)
    getattr(engine, op)(patch, pid)
"""


def _kill_at(point: str, op: str, pid: int, arg: str) -> int:
    env = {**os.environ, **faults.environment(point)}
    done = subprocess.run([sys.executable, "-c", RUNNER, op, str(pid), arg], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    return done.returncode


def _no_thread_stopped(pid: int) -> None:
    deadline = time.monotonic() + 5
    while True:
        found = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
            except OSError:
                continue
            found.append(stat.rsplit(")", 1)[1].split()[0])
        if "t" not in found and "T" not in found:
            return
        assert time.monotonic() < deadline, f"threads still stopped: {found}"
        time.sleep(0.01)


# (main thread, workers): the main thread parked in a read (the hijack path), or
# running Python with no thread parked (the pending-call path).
SHAPES = {"parked": ("stdin", ""), "parked+busy": ("stdin", "busy:1"), "busy": ("busy", "")}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("point", POINTS)
def test_apply_killed(start_py: StartPy, shop: Path, python: str, point: str, shape: str) -> None:
    main, workers = SHAPES[shape]
    target = start_py("--main", main, "--workers", workers)
    call = target.call if main == "stdin" else target.call_by_signal
    patch = make_py_patch(shop, python)
    path = shop / patch.artifact.file_name
    path.write_bytes(patch.artifact.to_bytes())
    status = _kill_at(point, "apply", target.pid, str(path))
    parked = main == "stdin"
    unreachable = {"py-queued"} if parked else {"py-hijacked"}
    assert status == (0 if point in unreachable else -9)
    _no_thread_stopped(target.pid)
    assert target.alive()
    # A thread may still run what was armed: wait until the page settles.
    time.sleep(0.3)
    behaviour = call(LONG)
    applied = [s.patch_id for s in states.status(target.pid)]
    assert behaviour in (ORIGINAL_LONG, BLOCKED_LONG), behaviour  # never half
    assert (behaviour == BLOCKED_LONG) == (applied == ["hdr-fix"]), (status, behaviour, applied)
    engine.repair(target.pid)
    if not applied:
        engine.apply(patch, target.pid)
    assert call(LONG) == BLOCKED_LONG
    engine.remove("hdr-fix", target.pid)
    assert call(LONG) == ORIGINAL_LONG


@pytest.mark.parametrize("point", ["py-operation-written", "py-armed", "py-hijacked", "py-resumed"])
def test_remove_killed(start_py: StartPy, shop: Path, python: str, point: str) -> None:
    target = start_py()
    original = target.ask("code")
    engine.apply(make_py_patch(shop, python), target.pid)
    assert _kill_at(point, "remove", target.pid, "hdr-fix") == -9
    _no_thread_stopped(target.pid)
    time.sleep(0.3)
    behaviour = target.call(LONG)
    applied = [s.patch_id for s in states.status(target.pid)]
    assert behaviour in (ORIGINAL_LONG, BLOCKED_LONG), behaviour
    assert (behaviour == BLOCKED_LONG) == (applied == ["hdr-fix"])
    if applied:
        engine.remove("hdr-fix", target.pid)
    assert target.call(LONG) == ORIGINAL_LONG
    assert target.ask("code") == original
