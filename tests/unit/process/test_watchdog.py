"""process/watchdog.py: the supervisor kills a patcher frozen in an armed stop, never
one that disarmed, never anything once the patcher is gone; real processes, SIGSTOP
for real (no ptrace needed: what is armed is only a promise to disarm)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from micropatch.process import watchdog

PATCHER = """
import os, signal, sys, time
from pathlib import Path
from micropatch.process.watchdog import Watchdog, operation, watched
limit, mode, record = float(sys.argv[1]), sys.argv[2], sys.argv[3]
dog = Watchdog.start(limit, record=Path(record) if record else None)
print(dog.child, flush=True)
with operation("apply fix-1"), watched(7, "the stop of process 7 (target)", 0.1):
    with watched(7, "the stop of process 7 (target)", 0.1):  # nested: the outer one counts
        pass
    if mode == "freeze":
        os.kill(os.getpid(), signal.SIGSTOP)
if mode == "disarmed":
    time.sleep(2 * (limit + 0.1) + 0.5)
if mode == "late":  # the supervisor reads the arming, is held up, and finds the disarm late
    import fcntl, struct, termios
    def unread():
        return struct.unpack("i", fcntl.ioctl(dog.fd, termios.FIONREAD, bytes(4)))[0]
    with watched(7, "the stop of process 7 (target)", 0.1):
        while unread():
            time.sleep(0.001)
        os.kill(dog.child, signal.SIGSTOP)
    time.sleep(limit + 0.3)  # past the deadline, the disarm unread
    os.kill(dog.child, signal.SIGCONT)
    time.sleep(0.5)
if mode == "exit":
    sys.exit(0)
dog.close()
print("done", flush=True)
"""


def _patcher(limit: float, mode: str, record: str = "") -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PATCHER, str(limit), mode, record],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_a_frozen_patcher_is_killed_after_the_limit(tmp_path: Path) -> None:
    record = tmp_path / "watchdog.json"
    child = _patcher(0.3, "freeze", str(record))
    _pid, status = os.waitpid(child.pid, os.WUNTRACED)  # frozen inside the armed block
    frozen = time.monotonic()
    assert os.WIFSTOPPED(status)
    _out, err = child.communicate(timeout=30)
    held = time.monotonic() - frozen
    assert child.returncode == -signal.SIGKILL
    assert held < 0.4 + 1.0, held  # timeout 0.1 + limit 0.3, with room for a loaded machine
    assert "micropatch: watchdog: the stop of process 7 (target) (apply fix-1) held its " in err
    assert "killed the patcher" in err and "completes or rolls back" in err
    said = json.loads(record.read_text())
    assert said["what"] == "the stop of process 7 (target) (apply fix-1)" and said["pid"] == 7
    assert said["limit"] == 0.4 and 0.4 <= said["held"] < 1.4
    assert watchdog.previous(record) == said and not record.exists()
    assert watchdog.previous(record) is None


def test_a_disarmed_stop_is_not_killed() -> None:
    child = _patcher(0.2, "disarmed")
    out, err = child.communicate(timeout=30)
    assert (child.returncode, out.split()[1:]) == (0, ["done"]), err
    assert "watchdog" not in err


def test_a_disarm_read_late_is_read_before_any_kill() -> None:
    child = _patcher(0.2, "late")
    out, err = child.communicate(timeout=30)
    assert (child.returncode, out.split()[1:]) == (0, ["done"]), err


def test_the_supervisor_ends_with_its_patcher() -> None:
    """Killed (the way a frozen patcher dies) or exited, the patcher takes its
    supervisor along (pidfd or pipe EOF): no supervisor outlives it to kill a pid
    that is reused."""
    for mode in ("exit", "freeze"):
        child = _patcher(5.0, mode)
        supervisor = int(child.stdout.readline()) if child.stdout else 0
        if mode == "freeze":
            os.waitpid(child.pid, os.WUNTRACED)
            child.kill()
        child.communicate(timeout=30)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{supervisor}") and _state(supervisor) != "Z":
            assert time.monotonic() < deadline, f"supervisor {supervisor} outlived its patcher"
            time.sleep(0.01)


def test_only_the_process_the_variable_names_writes_to_the_pipe(monkeypatch) -> None:
    """A child that inherits the variable has not the pipe: the variable names its
    parent, and the child writes nothing to a descriptor of that number."""
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)
    try:
        monkeypatch.setenv(watchdog.VARIABLE, f"{os.getppid()}:{write_end}")
        with watchdog.operation("apply x"), watchdog.watched(7, "a stop", 1.0):
            pass
        assert _pending(read_end) == b""
        monkeypatch.setenv(watchdog.VARIABLE, f"{os.getpid()}:{write_end}")
        with watchdog.operation("apply  x"), watchdog.watched(7, "a\nstop", 1.5):
            pass
        token = threading.get_native_id()
        lines = _pending(read_end).decode().splitlines()
        assert [line.split()[:2] for line in lines] == [
            ["L", str(token)],
            ["A", str(token)],
            ["D", str(token)],
            ["L", str(token)],
        ]
        assert lines[0].endswith(" apply x") and lines[1].endswith(" 1.5 7 a stop")
    finally:
        os.close(read_end)
        os.close(write_end)


def _pending(fd: int) -> bytes:
    try:
        return os.read(fd, 65536)
    except BlockingIOError:
        return b""


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def test_a_supervisor_that_cannot_start_is_said_and_stops_run_unwatched(
    monkeypatch, caplog
) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    monkeypatch.delenv(watchdog.VARIABLE, raising=False)
    with watchdog.watching(1.0) as on:
        assert on is False and watchdog.VARIABLE not in os.environ
        with watchdog.watched(7, "a stop", 1.0):  # no pipe: nothing to arm
            pass
    assert "the stop watchdog could not start" in caplog.text
    assert "stops are not watched" in caplog.text
