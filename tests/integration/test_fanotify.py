"""The fanotify binding against the kernel: real permission events, held and answered."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from micropatch.process import fanotify
from micropatch.process.fanotify import Fanotify


def _events(group: Fanotify, timeout: float = 5.0) -> list[fanotify.FanotifyEvent]:
    ready, _, _ = select.select([group.fd], [], [], timeout)
    assert ready, "no fanotify event"
    return group.read()


def test_an_open_is_held_until_allowed_and_names_the_thread(tmp_path: Path) -> None:
    path = tmp_path / "watched"
    path.write_text("content")
    opened: dict[str, object] = {}

    def reader() -> None:
        opened["tid"] = threading.get_native_id()
        with open(path) as f:
            opened["text"] = f.read()
        opened["at"] = time.monotonic()

    with Fanotify() as group:
        group.mark(str(path), fanotify.FAN_OPEN_PERM)
        thread = threading.Thread(target=reader)
        thread.start()
        (event,) = _events(group)
        held_at = time.monotonic()
        time.sleep(0.05)
        assert "text" not in opened  # the open waits for our answer
        assert event.permission and event.mask & fanotify.FAN_OPEN_PERM
        assert event.pid == opened["tid"]  # FAN_REPORT_TID: the opening thread
        assert os.readlink(f"/proc/self/fd/{event.fd}") == str(path)
        group.answer(event.fd)
        os.close(event.fd)
        thread.join(5)
        assert opened["text"] == "content" and float(opened["at"]) >= held_at  # type: ignore[arg-type]


def test_an_exec_on_a_marked_filesystem_is_held_and_closing_the_group_allows_it(
    tmp_path: Path,
) -> None:
    """Every exec on that filesystem is held (the whole host's, for /): a thread answers
    the others at once and keeps ours; Popen itself waits until the exec is done."""
    program = tmp_path / "np_fan_true"
    shutil.copy("/bin/true", program)
    mine: list[fanotify.FanotifyEvent] = []
    found = threading.Event()
    stop = threading.Event()
    with Fanotify() as group:

        def answer_others() -> None:
            while not stop.is_set():
                ready, _, _ = select.select([group.fd], [], [], 0.05)
                for e in group.read() if ready else []:
                    if not found.is_set() and os.readlink(f"/proc/self/fd/{e.fd}") == str(program):
                        mine.append(e)
                        found.set()
                        continue
                    group.answer(e.fd)
                    os.close(e.fd)

        answering = threading.Thread(target=answer_others)
        group.mark(str(tmp_path), fanotify.FAN_OPEN_EXEC_PERM, fanotify.FAN_MARK_FILESYSTEM)
        answering.start()
        try:
            outcome: dict[str, int] = {}
            runner = threading.Thread(
                target=lambda: outcome.update(rc=subprocess.run([str(program)]).returncode)
            )
            runner.start()
            assert found.wait(5), "no exec event for the program"
            (event,) = mine
            assert event.mask & fanotify.FAN_OPEN_EXEC_PERM
            time.sleep(0.05)
            assert runner.is_alive()  # held
            os.close(event.fd)
        finally:
            stop.set()
            answering.join()
    # the group closed with the event unanswered: the kernel allows it
    runner.join(5)
    assert outcome == {"rc": 0}


def test_without_cap_sys_admin_the_error_says_so() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed")
    code = (
        "from micropatch.process.fanotify import Fanotify\n"
        "from micropatch.errors import FanotifyUnavailable\n"
        "try:\n    Fanotify()\nexcept FanotifyUnavailable as e:\n    print(e)\n"
    )
    done = subprocess.run(
        ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-c", code],
        capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    assert "EPERM" in done.stdout and "CAP_SYS_ADMIN" in done.stdout
