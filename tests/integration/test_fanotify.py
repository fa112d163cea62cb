"""The fanotify binding against the kernel: real permission events, held and answered,
and real file events reported by directory handle and name. Each check runs in a
sandbox (targets/isolation.py) on its private tmpfs: no mark on the host's
filesystems (targets/fanotify_checks.py holds the checks)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from targets.isolation import Sandbox, available

CHECKS = Path(__file__).resolve().parent.parent / "targets" / "fanotify_checks.py"
needs = pytest.mark.skipif(not available(), reason="needs root, unshare and nsenter")


def check(tmp_path: Path, name: str) -> dict[str, Any]:
    with Sandbox(tmp_path / "host") as box:
        done = box.run(sys.executable, CHECKS, name, box.root, timeout=60)
    assert done.returncode == 0, done.stderr
    return dict(json.loads(done.stdout))


@needs
def test_an_open_is_held_until_allowed_and_names_the_thread(tmp_path: Path) -> None:
    seen = check(tmp_path, "open")
    assert seen == {
        "waited": True,  # the open waits for our answer
        "permission": True, "open_perm": True,
        "thread": True,  # FAN_REPORT_TID: the opening thread
        "path": True, "read_after": True,
    }  # fmt: skip


@needs
def test_an_exec_on_a_marked_filesystem_is_held_and_closing_the_group_allows_it(
    tmp_path: Path,
) -> None:
    """Every exec on that filesystem is held: a thread answers the others at once and
    keeps ours; the exec waits until the group closes, then runs."""
    assert check(tmp_path, "exec") == {"seen": True, "exec_perm": True, "held": True, "ran": True}


@needs
def test_created_renamed_written_and_deleted_files_are_reported_by_directory_and_name(
    tmp_path: Path,
) -> None:
    """What the module index is kept current with: each event names the directory by
    a handle (resolved where it is now) and the entry by name."""
    events = check(tmp_path, "names")["events"]
    assert events == [
        [".", "venv", ["CREATE", "ONDIR"]],
        ["moved", "lib", ["CREATE", "ONDIR"]],
        ["moved/lib", ".new", ["CREATE", "CLOSE_WRITE"]],
        ["moved/lib", "libx.so", ["MOVED_TO"]],
        ["moved", "liby.so", ["CREATE", "DELETE"]],
        [".", "moved", ["MOVED_TO", "ONDIR"]],
    ]


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
