"""A frozen patcher does not freeze the target (issue 20 item 2).

`micropatch apply/remove/update` stops itself (SIGSTOP, for real:
`faults.environment(point, action="stop")`) at every checkpoint inside a stop. Its
stop watchdog (process/watchdog.py) must SIGKILL it within the stop timeout plus the
limit; the target's threads then run again, the target is consistent (patched or
not, its registry agreeing with its bytes), and `micropatch repair` (or any next
command) completes or rolls back what was left and says so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from micropatch import faults, live

from .patching import assert_untouched, make_patch, patch_source
from .test_crash import (
    APPLY_NEW_CAVE,
    FIX_A,
    FIX_A2,
    FIX_B,
    PATCHED,
    PATCHED_V2,
    REMOVE,
    UNPATCHED,
    UPDATE,
    _behaviour,
    _no_thread_stopped,
    _registry_agrees,
)

STOP_TIMEOUT = 0.5
LIMIT = 0.5
SLACK = 1.5  # a loaded machine: the supervisor's wake-up, the kill, our own waitpid
FROZEN = [("apply", p) for p in ["stopped", *APPLY_NEW_CAVE]]
FROZEN += [("remove", p) for p in REMOVE] + [("update", p) for p in UPDATE]


def _frozen_at(point: str, op: str, pid: int, arg: str) -> tuple[float, str]:
    """Run `micropatch OP` stopped at `point`; seconds from its freeze to its death
    (by its watchdog), and its stderr."""
    env = {**os.environ, **faults.environment(point, action="stop")}
    unsigned = [] if op == "remove" else ["--allow-unsigned"]
    cli = subprocess.Popen(
        ["micropatch", op, arg, "--pid", str(pid), *unsigned,
         "--stop-timeout", str(STOP_TIMEOUT), "--watchdog", str(LIMIT)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _, status = os.waitpid(cli.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status), f"never reached {point}: status {status:#x}"
        frozen = time.monotonic()
        assert _stopped_threads(pid), "the patcher froze outside a stop"
        deadline = frozen + STOP_TIMEOUT + LIMIT + SLACK
        while not (waited := os.waitpid(cli.pid, os.WNOHANG))[0]:  # the watchdog's kill
            assert time.monotonic() < deadline, "the frozen patcher was not killed in time"
            time.sleep(0.005)
        held = time.monotonic() - frozen
        cli.returncode = -os.WTERMSIG(waited[1]) if os.WIFSIGNALED(waited[1]) else waited[1]
        _, err = cli.communicate(timeout=30)
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
    assert cli.returncode == -signal.SIGKILL, err
    return held, err


def _stopped_threads(pid: int) -> int:
    count = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        count += stat.rsplit(")", 1)[1].split()[0] == "t"
    return count


def _write(tmp_path: Path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(source)
    return str(path)


@pytest.mark.parametrize(("op", "point"), FROZEN)
def test_a_frozen_patcher_is_killed_and_the_next_command_repairs(
    targets, start, tmp_path, op, point
):
    t = start("twofuncs")
    v1 = _write(tmp_path, "v1.toml", patch_source(targets.twofuncs, [FIX_A, FIX_B]))
    v2 = _write(tmp_path, "v2.toml", patch_source(targets.twofuncs, [FIX_A2, FIX_B], version=2))
    if op != "apply":
        live.apply(make_patch(targets.twofuncs, [FIX_A, FIX_B]), t.pid)
    arg = {"apply": v1, "update": v2, "remove": "test-fix"}[op]
    held, err = _frozen_at(point, op, t.pid, arg)
    assert held < STOP_TIMEOUT + LIMIT + SLACK, held
    assert "micropatch: watchdog: the stop of " in err and f"process {t.pid}" in err, err
    assert f"({op} test-fix) held its threads" in err, err
    _no_thread_stopped(t.pid)
    said = _registry_agrees(t.pid)
    assert _behaviour(t) in (UNPATCHED, PATCHED, PATCHED_V2, ("1006", UNPATCHED[1]),
                             (UNPATCHED[0], PATCHED[1]))  # fmt: skip
    repaired = subprocess.run(["micropatch", "repair", "--pid", str(t.pid)],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert repaired.returncode == 0, repaired.stderr
    if any(not s.endswith(":applied") for s in said):
        assert "completed the " in repaired.stdout or "rolled back the " in repaired.stdout
    assert all(s.state == "applied" for s in live.status(t.pid))
    assert _behaviour(t) in (UNPATCHED, PATCHED, PATCHED_V2, ("1006", UNPATCHED[1]))
    for state in live.status(t.pid):
        live.remove(state.patch_id, t.pid)
    assert_untouched(targets, "twofuncs", t.pid, ["check_a", "check_b"])


def test_the_next_apply_says_what_it_completed(targets, start, tmp_path):
    """No repair in between: the operator runs the same command again; it finishes the
    change the frozen one left, and says so."""
    t = start("twofuncs")
    v1 = _write(tmp_path, "v1.toml", patch_source(targets.twofuncs, [FIX_A, FIX_B]))
    _frozen_at("jump-0-written", "apply", t.pid, v1)
    _no_thread_stopped(t.pid)
    again = subprocess.run(["micropatch", "apply", v1, "--pid", str(t.pid), "--allow-unsigned"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert again.returncode == 0, again.stderr
    said = again.stdout + again.stderr
    assert (
        f"pid {t.pid}: first rolled back the application of test-fix v1, left by an "
        "interrupted micropatch"
        in said
        or "first completed the application of test-fix" in said
    )
    assert _behaviour(t) == PATCHED
    live.remove("test-fix", t.pid)
    assert_untouched(targets, "twofuncs", t.pid, ["check_a", "check_b"])


def test_a_healthy_command_is_not_killed(targets, start, tmp_path):
    """The watchdog armed and disarmed around every stop of an ordinary apply and
    remove, with a limit far below the default: nothing is killed."""
    t = start("twofuncs")
    v1 = _write(tmp_path, "v1.toml", patch_source(targets.twofuncs, [FIX_A, FIX_B]))
    for command in (["apply", v1, "--allow-unsigned"], ["remove", "test-fix"]):
        done = subprocess.run(["micropatch", *command, "--pid", str(t.pid), "--watchdog", "0.5"],
                              capture_output=True, text=True, timeout=60)  # fmt: skip
        assert done.returncode == 0 and "watchdog" not in done.stderr, done.stderr
    assert_untouched(targets, "twofuncs", t.pid, ["check_a", "check_b"])
