"""A patched interpreter that forks (a prefork server's master making its workers):
the child runs the patched code and carries its own copy of the page (mapped
private), so `status` reads the patch there and a remove in the child leaves the
parent patched, and the other way round."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropatch.runtimes.cpython import engine, states

from .conftest import make_py_patch
from .test_live import LONG

FORKER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from shop.parsers import parse_header
print("ready", os.getpid(), flush=True)
sys.stdin.readline()
child = os.fork()
if child == 0:
    print("child", os.getpid(), flush=True)
    for line in sys.stdin:
        try:
            print(repr(parse_header(line.strip())), flush=True)
        except ValueError as e:
            print("ERR", e, flush=True)
    os._exit(0)
time.sleep(1000)
"""


@pytest.fixture
def forker(python: str, shop: Path) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([python, "-c", FORKER, str(shop)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    yield proc
    proc.kill()
    proc.wait()


def _line(proc: subprocess.Popen[str], text: str | None = None) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    if text is not None:
        proc.stdin.write(text + "\n")
        proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_a_forked_child_carries_its_own_copy_of_the_patch(
    forker: subprocess.Popen[str], shop: Path, python: str
) -> None:
    assert _line(forker) == f"ready {forker.pid}"
    engine.apply(make_py_patch(shop, python), forker.pid)
    child = int(_line(forker, "fork").split()[1])
    try:
        assert _line(forker, LONG) == "ERR header too long"  # the child runs the patch
        [state] = states.status(child)
        assert (state.patch_id, state.blocked) == ("hdr-fix", 1)
        engine.remove("hdr-fix", child)
        assert _line(forker, LONG) == repr(("x" * 60, "1"))
        assert states.status(child) == []
        [parent] = states.status(forker.pid)  # its own page: still patched, counted 0
        assert (parent.patch_id, parent.blocked) == ("hdr-fix", 0)
        engine.apply(make_py_patch(shop, python), child)  # and the child again
        engine.remove("hdr-fix", forker.pid)
        assert [s.patch_id for s in states.status(child)] == ["hdr-fix"]
        assert _line(forker, LONG) == "ERR header too long"
    finally:
        os.kill(child, signal.SIGKILL)
