"""Fault injection for the crash-safety tests: an internal hook, not an option.

`checkpoint(name)` kills the calling process with SIGKILL, for real, when the
environment variable MICROPATCH_FAULT names that point: the tests start a
patcher in a subprocess with it set and check what the target is left with.
Points: see the `checkpoint(...)` calls (`grep -rn checkpoint src`).
"""

from __future__ import annotations

import os
import signal

VARIABLE = "MICROPATCH_FAULT"


def checkpoint(name: str) -> None:
    """Die here, at once and without cleanup, if the tests asked for it."""
    wanted = os.environ.get(VARIABLE)
    if wanted is not None and wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)
