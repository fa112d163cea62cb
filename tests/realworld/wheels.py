"""Module files unpacked from pinned wheels on PyPI, for the author-tool tests.

    from .wheels import wheel_member

    so = wheel_member("pillow==12.1.0", "PIL/_imaging.cpython-311-x86_64-linux-gnu.so")

`pip download --no-deps --only-binary=:all: --python-version 3.11` (or the
`python` asked, for releases older than 3.11) fetches the wheel once per pytest
session (the files are deleted when it ends); the member
is unpacked beside it. If pip cannot fetch it (the index is unreachable), the
calling test is skipped with pip's last error line.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import pytest

from micropatch.tools.analysis import ModuleAnalysis

DOWNLOAD_TIMEOUT = 180.0

_lock = threading.Lock()
_root: list[Path] = []
_fetched: dict[tuple[str, str, str | None], Path] = {}
_failed: dict[tuple[str, str, str | None], str] = {}


def wheel_member(
    requirement: str, member: str, python: str = "3.11", platform: str | None = None
) -> Path:
    """The file `member` of the wheel of `requirement` (pin it: `name==version`) for
    CPython `python`, and the wheel `platform` tag asked (else pip's choice)."""
    key = (requirement, python, platform)
    with _lock:
        if key in _failed:
            pytest.skip(_failed[key])
        if key not in _fetched:
            try:
                _fetched[key] = _download(requirement, python, platform)
            except _DownloadFailed as e:
                _failed[key] = str(e)
                pytest.skip(str(e))
        wheel = _fetched[key]
        target = wheel.parent / "unpacked" / member
        if not target.exists():
            with zipfile.ZipFile(wheel) as archive:
                archive.extract(member, wheel.parent / "unpacked")
        return target


@functools.cache
def _index(path: Path) -> ModuleAnalysis:
    return ModuleAnalysis.open(path)


def module_index(
    requirement: str, member: str, python: str = "3.11", platform: str | None = None
) -> ModuleAnalysis:
    """`wheel_member`, opened as a ModuleAnalysis shared by the whole session, so its
    analyses are computed once for the explore and the diff tests."""
    return _index(wheel_member(requirement, member, python, platform))


class _DownloadFailed(Exception):
    pass


def _download(requirement: str, python: str, platform: str | None) -> Path:
    if not _root:
        _root.append(Path(tempfile.mkdtemp(prefix="realworld-wheels-")))
        atexit.register(shutil.rmtree, _root[0], ignore_errors=True)
    directory = Path(tempfile.mkdtemp(dir=_root[0]))
    command = [
        sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
        "--no-input", "--no-deps", "--only-binary=:all:", "--python-version", python,
        "--timeout", "30", "--retries", "2", "-d", str(directory), requirement,
        *(["--platform", platform] if platform else []),
    ]  # fmt: skip
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise _DownloadFailed(
            f"cannot download {requirement}: pip did not finish in {DOWNLOAD_TIMEOUT:.0f} s"
        ) from None
    wheels = sorted(directory.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")] or lines or ["no wheel"]
        raise _DownloadFailed(
            f"cannot download {requirement} from the package index (unreachable?): {errors[-1]}"
        )
    return wheels[0]
