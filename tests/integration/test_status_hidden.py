"""`micropatch status` run by a user who cannot read every process says so, instead
of leaving their patches out without a word."""

from __future__ import annotations

import subprocess
import sys

DROP_AND_SAY = (
    "import os\n"
    "from micropatch.cli import status, say\n"
    "import micropatch.process.select  # imported while it can be (the stdlib may be 0700)\n"
    "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
    "status._say_hidden()\n"
)


def test_a_user_who_cannot_read_other_processes_is_told() -> None:
    done = subprocess.run(
        [sys.executable, "-c", DROP_AND_SAY], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    # pid 1 (and this test's own root processes) cannot be read by uid 65534.
    assert "processes of other users could not be read" in done.stderr, done.stderr
    assert "run as root to see every process" in " ".join(done.stderr.split())


def test_root_is_told_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "-c", "from micropatch.cli import status; status._say_hidden()"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0 and done.stderr == ""
