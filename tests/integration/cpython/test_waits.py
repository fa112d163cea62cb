"""Interpreters whose only thread waits where services wait: a child process
(`subprocess.run`: glibc's `waitpid` jumps to `wait4`), an asyncio event loop
(`epoll_wait`, which our stop interrupts with EINTR, not a restart code), a
listening socket, an event, `input()` on a terminal (C stdio's `fgets`). Apply is in force when it returns; the patch is
seen by a call from a signal handler (the only code that runs there)."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import time
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
elif kind == "terminal":  # input() on a terminal: PyOS_StdioReadline, C stdio's fgets
    input("> ")
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


def test_the_only_thread_in_input_on_a_terminal(shop: Path, python: str) -> None:
    """`input()` with a terminal on stdin and stdout reads with C stdio's fgets (from
    CPython's PyOS_StdioReadline): the thread is parked in its read, and EINTR makes
    CPython read again, as after a signal."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([python, "-c", WAITER, str(shop), "terminal"], stdin=slave,
                            stdout=slave, stderr=slave, start_new_session=True)  # fmt: skip
    os.close(slave)
    output = b""

    def line(match: bytes) -> bytes:
        nonlocal output
        deadline = time.monotonic() + 20
        while match not in output:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, f"no {match!r} in {output!r}"
            output += os.read(master, 4096)
        found, _, output = output.partition(match)
        return found

    def ask(text: str) -> str:
        (shop / "ask").write_text(text)
        os.kill(proc.pid, signal.SIGUSR1)
        answer: str = json.loads(line(b"\r\n").decode())
        return answer

    try:
        line(b"ready\r\n")
        line(b"> ")  # in input()
        outcome = engine.apply(make_py_patch(shop, python), proc.pid)
        assert "parked in system call 0" in outcome.entered, outcome.entered
        assert ask(LONG) == "ERR header too long"
        engine.remove("hdr-fix", proc.pid)
        assert ask(LONG) == repr(("x" * 60, "1"))
        os.write(master, b"typed\n")  # input() still reads the terminal
        assert line(b"typed\r\n") == b""
        assert proc.wait(10) == 0
    finally:
        proc.kill()
        proc.wait()
        os.close(master)
