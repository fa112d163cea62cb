"""Temporary virtual environments holding pinned releases from PyPI, for real-world tests.

    from .venvs import venv_python            # in a test module beside this one

    python = venv_python("pillow==12.1.0")      # Path to the venv's bin/python
    subprocess.run([python, "-c", "import PIL"])

Each venv is made with `python -m venv` from the interpreter running the tests
(so the wheels chosen match its version), and the requirements are installed
with pip from binary wheels only: a source build would give a different module
than the one a patch was written for. A venv is created once per pytest session
for each distinct set of requirements, and deleted when the session ends.

If pip cannot install the requirements (the index is unreachable, for one),
the calling test is skipped, with pip's last error line as the reason.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

INSTALL_TIMEOUT = 180.0  # seconds, for one `pip install`

_lock = threading.Lock()
_root: Path | None = None
_made: dict[tuple[str, ...], Path] = {}
_failed: dict[tuple[str, ...], str] = {}


def venv_python(*requirements: str) -> Path:
    """The interpreter of a session-wide temporary venv where `requirements` are installed.

    Requirements are pip requirement strings; pin them exactly (`name==version`).
    Skips the calling test if they cannot be installed.
    """
    if not requirements:
        raise ValueError("venv_python needs at least one requirement")
    key = tuple(sorted(requirements))
    with _lock:
        if key in _failed:
            pytest.skip(_failed[key])
        if key not in _made:
            try:
                _made[key] = _create(key)
            except _InstallFailed as e:
                _failed[key] = str(e)
                pytest.skip(str(e))
        return _made[key]


def site_packages(python: Path) -> Path:
    """The site-packages directory of the venv whose interpreter is `python`."""
    found = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True, timeout=30,
    )  # fmt: skip
    return Path(found.stdout.strip())


class _InstallFailed(Exception):
    pass


def _create(requirements: tuple[str, ...]) -> Path:
    global _root
    if _root is None:
        _root = Path(tempfile.mkdtemp(prefix="realworld-venvs-"))
        atexit.register(shutil.rmtree, _root, ignore_errors=True)
    target = Path(tempfile.mkdtemp(prefix="venv-", dir=_root))
    fast = _pip_has_python_option()
    # The host's pip can install into a venv made without its own pip (pip >= 22.3),
    # which saves the few seconds ensurepip takes.
    subprocess.run(
        [sys.executable, "-m", "venv", *(["--without-pip"] if fast else []), str(target)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    python = target / "bin" / "python"
    pip = (
        [sys.executable, "-m", "pip", "--python", str(python)]
        if fast
        else [str(python), "-m", "pip"]
    )
    command = [
        *pip, "install", "--quiet", "--disable-pip-version-check", "--no-input",
        "--only-binary=:all:", "--timeout", "30", "--retries", "2", *requirements,
    ]  # fmt: skip
    what = " ".join(requirements)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise _InstallFailed(
            f"cannot install {what}: pip did not finish in {INSTALL_TIMEOUT:.0f} s "
            "(package index unreachable or slow?)"
        ) from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no output"]
        raise _InstallFailed(
            f"cannot install {what} from the package index (unreachable?): {errors[-1]}"
        )
    return python


def _pip_has_python_option() -> bool:
    try:
        version = importlib.metadata.version("pip")
    except importlib.metadata.PackageNotFoundError:
        return False
    found = re.match(r"(\d+)\.(\d+)", version)
    return found is not None and (int(found[1]), int(found[2])) >= (22, 3)
