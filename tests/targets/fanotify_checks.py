"""The fanotify binding's checks, run inside a sandbox (targets/isolation.py) so that
their marks are on its private tmpfs, never on the host's filesystems:

    python fanotify_checks.py open|exec|names DIR

prints one JSON object of what it saw; tests/integration/test_fanotify.py asserts."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from micropatch.process import fanotify
from micropatch.process.fanotify import Fanotify


def _events(group: Fanotify, timeout: float = 5.0) -> list[fanotify.FanotifyEvent]:
    ready, _, _ = select.select([group.fd], [], [], timeout)
    assert ready, "no fanotify event"
    return group.read()


def held_open(directory: Path) -> dict[str, Any]:
    """An inode mark: the open waits for the answer; the event names the thread."""
    path = directory / "watched"
    path.write_text("content")
    opened: dict[str, Any] = {}

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
        waited = "text" not in opened
        result = {
            "waited": waited, "permission": event.permission,
            "open_perm": bool(event.mask & fanotify.FAN_OPEN_PERM),
            "thread": event.pid == opened["tid"],
            "path": os.readlink(f"/proc/self/fd/{event.fd}") == str(path),
        }  # fmt: skip
        group.answer(event.fd)
        os.close(event.fd)
        thread.join(5)
    result["read_after"] = opened.get("text") == "content" and opened["at"] >= held_at
    return result


def held_exec(directory: Path) -> dict[str, Any]:
    """A filesystem mark: every exec there is held; a thread answers the others and
    keeps ours; closing the group with it unanswered allows it."""
    program = directory / "np_fan_true"
    shutil.copy("/bin/true", program)
    mine: list[fanotify.FanotifyEvent] = []
    found = threading.Event()
    stop = threading.Event()
    outcome: dict[str, int] = {}
    result: dict[str, Any] = {}
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
        group.mark(str(directory), fanotify.FAN_OPEN_EXEC_PERM, fanotify.FAN_MARK_FILESYSTEM)
        answering.start()
        try:
            runner = threading.Thread(
                target=lambda: outcome.update(rc=subprocess.run([str(program)]).returncode)
            )
            runner.start()
            result["seen"] = found.wait(5)
            (event,) = mine
            result["exec_perm"] = bool(event.mask & fanotify.FAN_OPEN_EXEC_PERM)
            time.sleep(0.05)
            result["held"] = runner.is_alive()
            os.close(event.fd)
        finally:
            stop.set()
            answering.join()
    runner.join(5)  # the group closed with the event unanswered: the kernel allows it
    result["ran"] = outcome == {"rc": 0}
    return result


def names(directory: Path) -> dict[str, Any]:
    """A notification group reporting directory handles and names: a file created,
    written, renamed into place, linked; a directory made and renamed."""
    group = Fanotify(
        fanotify.FAN_CLASS_NOTIF | fanotify.FAN_CLOEXEC | fanotify.FAN_NONBLOCK
        | fanotify.FAN_REPORT_DFID_NAME, os.O_RDONLY | os.O_CLOEXEC,
    )  # fmt: skip
    mask = (fanotify.FAN_CREATE | fanotify.FAN_MOVED_TO | fanotify.FAN_CLOSE_WRITE
            | fanotify.FAN_DELETE | fanotify.FAN_ONDIR)  # fmt: skip
    group.mark(str(directory), mask, fanotify.FAN_MARK_FILESYSTEM)
    root = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    (directory / "venv/lib").mkdir(parents=True)
    (directory / "venv/lib/.new").write_text("x")
    os.rename(directory / "venv/lib/.new", directory / "venv/lib/libx.so")
    os.link(directory / "venv/lib/libx.so", directory / "venv/liby.so")
    os.rename(directory / "venv", directory / "moved")
    (directory / "moved/liby.so").unlink()
    seen = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(seen) < 7:
        select.select([group.fd], [], [], 0.2)
        for e in group.read(fanotify.FID_READ_SIZE):
            assert e.fid is not None and e.fd == fanotify.FAN_NOFD
            fd = fanotify.open_by_handle(root, e.fid.handle)
            where = os.readlink(f"/proc/self/fd/{fd}")
            os.close(fd)
            kinds = [n for n in ("CREATE", "MOVED_TO", "CLOSE_WRITE", "DELETE", "ONDIR")
                     if e.mask & getattr(fanotify, f"FAN_{n}")]  # fmt: skip
            seen.append([os.path.relpath(where, directory), e.fid.name, kinds])
    group.close()
    return {"events": seen}


if __name__ == "__main__":
    check = {"open": held_open, "exec": held_exec, "names": names}[sys.argv[1]]
    print(json.dumps(check(Path(sys.argv[2]))))
