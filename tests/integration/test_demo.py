"""`micropatch demo` works, quickly, and without root."""

from __future__ import annotations

import io
import os
import time

import pytest
from rich.console import Console

from micropatch.demo.runner import run


def test_demo_as_root_or_whoever_we_are():
    text = io.StringIO()
    started = time.monotonic()
    run(Console(file=text, width=120))
    assert time.monotonic() - started < 10
    out = text.getvalue()
    assert "the exploit works" in out and "exploit blocked" in out
    assert "rejected: name too long" in out and "exited cleanly (status 0)" in out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become an unprivileged user")
def test_demo_without_root():
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        status = 1
        with os.fdopen(write_end, "w") as out:
            try:
                os.setgid(65534)
                os.setuid(65534)
                os.environ["TMPDIR"] = "/tmp"
                run(Console(file=out, width=120))
                status = 0
            except BaseException as e:
                out.write(f"FAILED: {type(e).__name__}: {e}")
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        out = f.read()
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, out
    assert "exploit blocked" in out and "exited cleanly" in out
