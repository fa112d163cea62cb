"""micropatch.faults: the fault points are listed in one place, and a process dies at
one only when a test armed it with both switches."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import micropatch
from micropatch import faults

SOURCES = sorted(Path(micropatch.__file__).parent.rglob("*.py"))


def _calls() -> list[tuple[str, int, ast.Call]]:
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "checkpoint":
                found.append((path.name, node.lineno, node))
    return found


def test_every_checkpoint_names_a_listed_point_and_every_point_is_reached() -> None:
    calls = _calls()
    assert calls, "no checkpoint(...) found: the scan is broken"
    used = set()
    for name, line, call in calls:
        [point, *_] = call.args
        assert isinstance(point, ast.Constant) and isinstance(point.value, str), (
            f"{name}:{line}: checkpoint() takes a literal point name (an index goes in index=)"
        )
        assert point.value in faults.POINTS, f"{name}:{line}: {point.value!r} is not in POINTS"
        templated = "{index}" in point.value
        assert templated == any(k.arg == "index" for k in call.keywords), (
            f"{name}:{line}: {point.value!r}: index= goes with an {{index}} point, only"
        )
        used.add(point.value)
    assert set(faults.POINTS) == used, f"listed, never reached: {set(faults.POINTS) - used}"


def test_known_names() -> None:
    assert faults.known("stopped") and faults.known("jump-0-written")
    assert faults.known("site-12-restored")
    assert not faults.known("jump-x-written") and not faults.known("stoped")
    with pytest.raises(ValueError, match=r"'stoped' names no fault point; the points are: stopped"):
        faults.environment("stoped")


RUN = """
import sys
from micropatch.faults import checkpoint
checkpoint("stopped")
checkpoint("jump-{index}-written", index=int(sys.argv[1]))
print("survived")
"""


def _run(env: dict[str, str], index: int = 0) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MICROPATCH_FAULT")}
    return subprocess.run([sys.executable, "-c", RUN, str(index)], env={**clean, **env},
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def test_armed_it_dies_there() -> None:
    assert _run(faults.environment("stopped")).returncode == -signal.SIGKILL
    assert _run(faults.environment("jump-2-written"), index=2).returncode == -signal.SIGKILL
    missed = _run(faults.environment("jump-2-written"), index=1)  # another site
    assert (missed.returncode, missed.stdout) == (0, "survived\n")


def test_the_point_alone_does_nothing() -> None:
    """MICROPATCH_FAULT without the test-only switch (or with another value) is inert."""
    for env in ({faults.VARIABLE: "stopped"},
                {faults.VARIABLE: "stopped", faults.ARM_VARIABLE: "1"},
                {faults.VARIABLE: "no-such-point"}):  # fmt: skip
        done = _run(env)
        assert (done.returncode, done.stdout) == (0, "survived\n"), done.stderr


def test_an_armed_unknown_point_is_refused_at_the_first_checkpoint() -> None:
    done = _run({faults.VARIABLE: "stoped", faults.ARM_VARIABLE: faults.ARMED})
    assert done.returncode == 1 and "survived" not in done.stdout
    assert "ValueError: MICROPATCH_FAULT='stoped' names no fault point" in done.stderr


def test_armed_to_stop_it_stops_there() -> None:
    """action="stop": the process stops itself at the point (SIGSTOP), to be continued."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MICROPATCH_FAULT")}
    env = {**clean, **faults.environment("stopped", action="stop")}
    child = subprocess.Popen([sys.executable, "-c", RUN, "0"], env=env,
                             stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _pid, status = os.waitpid(child.pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
        os.kill(child.pid, signal.SIGCONT)
        child.returncode = None
        out, _ = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert (child.returncode, out) == (0, "survived\n")
    with pytest.raises(ValueError, match="fault action 'freeze': one of kill, stop"):
        faults.environment("stopped", action="freeze")
