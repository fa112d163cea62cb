"""`micropatch --version` says which micropatch this is (what a bug report needs)."""

from __future__ import annotations

import subprocess
import sys

from micropatch import __version__


def test_version() -> None:
    run = subprocess.run(
        [sys.executable, "-c", "from micropatch.cli.entry import main; main()", "--version"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (run.returncode, run.stdout, run.stderr) == (0, f"micropatch {__version__}\n", "")
