"""Interpreters whose only thread waits where services wait: a child process
(`subprocess.run`: glibc's `waitpid` jumps to `wait4`), an asyncio event loop
(`epoll_wait`, which our stop interrupts with EINTR, not a restart code), a
listening socket, an event. Apply is in force when it returns; the patch is
seen by a call from a signal handler (the only code that runs there)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropatch.runtimes.cpython import engine

from .conftest import make_py_patch
from .test_live import LONG

WAITER = """
import asyncio, json, os, signal, socket, subprocess, sys, threading
sys.path.insert(0, sys.argv[1])
from shop import parsers


def answer(signum, frame):
    try:
        result = repr(parsers.parse_header(open(sys.argv[1] + "/ask").read()))
    except ValueError as e:
        result = f"ERR {e}"
    print(json.dumps(result), flush=True)


signal.signal(signal.SIGUSR1, answer)
print("ready", flush=True)
kind = sys.argv[2]
if kind == "child":
    subprocess.run(["sleep", "1000"])
elif kind == "asyncio":
    asyncio.run(asyncio.sleep(1000))
elif kind == "accept":
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    server.accept()
elif kind == "event":
    threading.Event().wait()
"""
# How a thread got to run the operation, by the wait.
ENTERED = {
    "child": "parked in system call 61",
    "asyncio": "parked in system call 232",
    "accept": "parked in system call 288",  # accept4
    "event": "pending call",
}


@pytest.fixture
def waiter(
    python: str, shop: Path, request: pytest.FixtureRequest
) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([python, "-c", WAITER, str(shop), request.param],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    yield proc
    os.killpg(proc.pid, signal.SIGKILL)  # its `sleep` child too
    proc.wait()


def _ask(proc: subprocess.Popen[str], shop: Path, text: str) -> str:
    (shop / "ask").write_text(text)
    os.kill(proc.pid, signal.SIGUSR1)
    assert proc.stdout is not None
    answer: str = json.loads(proc.stdout.readline())
    return answer


@pytest.mark.parametrize("waiter", list(ENTERED), indirect=True)
def test_the_only_thread_waiting_like_a_service(
    waiter: subprocess.Popen[str], shop: Path, python: str
) -> None:
    kind = waiter.args[-1]
    outcome = engine.apply(make_py_patch(shop, python), waiter.pid)
    assert ENTERED[kind] in outcome.entered, outcome.entered
    assert _ask(waiter, shop, LONG) == "ERR header too long"
    engine.remove("hdr-fix", waiter.pid)
    assert _ask(waiter, shop, LONG) == repr(("x" * 60, "1"))
