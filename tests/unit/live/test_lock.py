"""The per-process lock (live/lock.py): queueing, timeout naming the holder, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from micropatch.errors import Busy, LockError, ProcessNotFound
from micropatch.live import lock
from micropatch.process.procfs import parse_start_time, start_time


def test_start_time_is_field_22_even_with_parentheses_in_the_name() -> None:
    rest = " ".join(str(n) for n in range(3, 53))  # fields 3..52 hold their own number
    assert parse_start_time(f"1234 (a) b (c)) {rest}") == 22
    assert start_time(os.getpid()) == start_time(os.getpid()) > 0


def test_lock_file_is_named_by_pid_and_start_time(tmp_path: Path) -> None:
    me = os.getpid()
    assert lock.lock_path(me, tmp_path) == tmp_path / f"{me}-{start_time(me)}.lock"
    with pytest.raises(ProcessNotFound):
        lock.lock_path(2**22 + 1, tmp_path)  # above pid_max's ceiling


def test_second_holder_times_out_naming_the_first(tmp_path: Path) -> None:
    me = os.getpid()
    waits: list[str] = []
    with lock.hold(me, directory=tmp_path):
        started = time.monotonic()
        with (
            pytest.raises(Busy) as caught,
            lock.hold(me, timeout=0.2, on_wait=waits.append, directory=tmp_path),
        ):
            pytest.fail("took a held lock")
        assert time.monotonic() - started >= 0.2
    message = str(caught.value)
    assert f"process {me} is being patched by micropatch (pid {me}, `" in message
    assert "--lock-timeout" in message and "nothing was changed" in message
    assert (caught.value.pid, caught.value.holder) == (me, me)
    assert len(waits) == 1 and waits[0].endswith("; waiting up to 0.2 s")
    assert not list(tmp_path.iterdir()), "the holder unlinks its lock file on release"


def test_waiter_goes_when_the_holder_is_done(tmp_path: Path) -> None:
    me = os.getpid()
    order: list[str] = []
    waiting = threading.Event()

    def second() -> None:
        with lock.hold(me, timeout=10, on_wait=lambda _: waiting.set(), directory=tmp_path):
            order.append("second")

    with lock.hold(me, directory=tmp_path):
        thread = threading.Thread(target=second)
        thread.start()
        assert waiting.wait(10)
        order.append("first")
    thread.join(10)
    assert order == ["first", "second"]


def test_waiting_block_sets_the_timeout_for_queued(tmp_path: Path) -> None:
    me = os.getpid()
    with (
        lock.hold(me, directory=tmp_path),
        lock.waiting(timeout=0.1, directory=tmp_path),
        pytest.raises(Busy),
        lock.queued(me),
    ):
        pass
    with lock.queued(me):  # outside the block: the defaults again
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    me = os.getpid()
    code = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from micropatch.live.lock import hold\n"
        f"with hold({me}, directory=Path({str(tmp_path)!r})):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(Busy) as caught, lock.hold(me, timeout=0.1, directory=tmp_path):
            pass
        assert caught.value.holder == holder.pid
        assert lock.holder(lock.lock_path(me, tmp_path)).pid == holder.pid  # type: ignore[union-attr]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with lock.hold(me, timeout=0.1, directory=tmp_path):
        pass


def test_lock_directory_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with (
        pytest.raises(LockError, match="writable by it alone"),
        lock.hold(os.getpid(), directory=shared),
    ):
        pass
    made = tmp_path / "made"
    with lock.hold(os.getpid(), directory=made):
        assert made.stat().st_mode & 0o777 == 0o700
