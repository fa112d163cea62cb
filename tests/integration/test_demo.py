"""`micropatch demo` works, quickly, and without root."""

from __future__ import annotations

import importlib
import io
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

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
    """The whole demo as uid 65534, with micropatch installed where anyone can read it.

    The checkout (and its venv, and here the interpreter) may live where 65534 cannot
    enter, which a real unprivileged user's install never does. So a forked child runs
    the demo once as root, to import every module it needs from the interpreter and the
    dependencies, then drops privileges and imports micropatch afresh from a
    world-readable copy of the package, which the demo reads its C source from."""
    import micropatch

    install = Path(tempfile.mkdtemp(prefix="micropatch-install-", dir="/tmp"))
    try:
        shutil.copytree(
            Path(micropatch.__file__).parent,
            install / "micropatch",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        for path in [install, *install.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        out, code = _in_child_as_nobody(install)
    finally:
        shutil.rmtree(install)
    assert code == 0, out
    assert f"imported from {install}" in out
    assert "exploit blocked" in out and "exited cleanly" in out


def _in_child_as_nobody(install: Path) -> tuple[str, int]:
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.close(read_end)
        status = 1
        with os.fdopen(write_end, "w") as out:
            try:
                run(Console(file=io.StringIO(), width=120))  # as root: imports, nothing else
                for name in [m for m in sys.modules if m.split(".")[0] == "micropatch"]:
                    del sys.modules[name]
                sys.path.insert(0, str(install))
                importlib.invalidate_caches()
                os.setgroups([])
                os.setgid(65534)
                os.setuid(65534)
                os.environ["TMPDIR"] = "/tmp"
                from micropatch.demo import runner

                out.write(f"imported from {Path(runner.__file__).parents[2]}\n")
                runner.run(Console(file=out, width=120))
                status = 0
            except BaseException as e:
                out.write(f"FAILED: {type(e).__name__}: {e}")
        os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        out = f.read()
    _, status = os.waitpid(child, 0)
    return out, os.waitstatus_to_exitcode(status)
