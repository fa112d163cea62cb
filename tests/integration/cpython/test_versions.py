"""Every supported CPython found on this machine (Debian's 3.11, pyenv's shared
builds of 3.11, 3.12, 3.13), and a clear refusal of an unsupported one.
MICROPATCH_TEST_PYTHON runs the whole suite on one of them."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from micropatch.errors import InterpreterError
from micropatch.process.maps import read_maps
from micropatch.process.memory import Memory
from micropatch.runtimes.cpython import engine, states
from micropatch.runtimes.cpython.interpreter import _interpreter_image
from micropatch.runtimes.cpython.page import MAPS_NAME

from .conftest import StartPy, make_py_patch
from .test_live import BLOCKED_LONG, LONG, ORIGINAL_LONG

PYENV = Path("/root/.pyenv/versions")
SUPPORTED = ["/usr/bin/python3.11", *(str(PYENV / v / "bin" / f"python{v.rsplit('.', 1)[0]}")
                                      for v in ("3.11.7", "3.12.1", "3.13.0"))]  # fmt: skip
UNSUPPORTED = str(PYENV / "3.10.13" / "bin" / "python3.10")


def _present(path: str) -> str:
    if not Path(path).exists():
        pytest.skip(f"{path} is not installed")
    return path


@pytest.mark.parametrize("interpreter", SUPPORTED)
def test_apply_remove(start_py: StartPy, shop: Path, interpreter: str) -> None:
    python = _present(interpreter)
    target = start_py("--workers", "busy:1,sleep:1", interpreter=python)
    original = target.ask("code")
    outcome = engine.apply(make_py_patch(shop, python), target.pid)
    assert target.call(LONG) == BLOCKED_LONG
    assert outcome.waited < 5
    engine.remove("hdr-fix", target.pid)
    assert target.call(LONG) == ORIGINAL_LONG
    assert target.ask("code") == original


def test_a_patch_for_another_version_is_refused(start_py: StartPy, shop: Path) -> None:
    other = _present(SUPPORTED[2])  # built by 3.12, the process runs Debian's 3.11
    target = start_py(interpreter=_present(SUPPORTED[0]))
    with pytest.raises(InterpreterError, match=r"this is Python 3\.11 .* compiled for 3\.12") as e:
        engine.apply(make_py_patch(shop, other), target.pid)
    assert "nothing was changed" in str(e.value)
    assert states.status(target.pid) == []
    # Refused from its memory: no page mapped, nothing run in it.
    assert MAPS_NAME not in Path(f"/proc/{target.pid}/maps").read_text()
    assert target.call(LONG) == ORIGINAL_LONG


def test_an_unsupported_version_is_refused(start_py: StartPy, shop: Path, python: str) -> None:
    target = start_py("--bare", interpreter=_present(UNSUPPORTED))
    with pytest.raises(InterpreterError, match=r"older than 3\.11") as e:
        engine.apply(make_py_patch(shop, python), target.pid)
    assert e.value.pid == target.pid
    assert states.status(target.pid) == []


@pytest.mark.parametrize(
    ("interpreter", "claimed"),
    [(SUPPORTED[2], (3, 12, 8)), (SUPPORTED[3], (3, 14, 0))],
    ids=["3.12.8", "3.14.0"],
)
def test_a_release_whose_layout_was_not_verified_is_refused_by_name(
    start_py: StartPy, shop: Path, interpreter: str, claimed: tuple[int, int, int]
) -> None:
    """No other 3.12/3.13 release (nor 3.14) is installable here, so a real 3.12.1 or
    3.13.0 says it is one: its `Py_Version` rewritten in its memory, which is what the
    engine reads. The refusal names the release and what is supported; nothing is
    mapped or run in the process."""
    python = _present(interpreter)
    target = start_py(interpreter=python)
    patch = make_py_patch(shop, python)
    major, minor, micro = claimed
    with Memory(target.pid) as memory:
        image, _ = _interpreter_image(target.pid, read_maps(target.pid), memory)
        version_at = image.symbol("Py_Version")
        assert version_at is not None
        memory.write(version_at, struct.pack("<Q", major << 24 | minor << 16 | micro << 8 | 0xF0))
    release = f"{major}.{minor}.{micro}"
    with pytest.raises(InterpreterError, match=rf"runs CPython {re.escape(release)} ") as e:
        engine.apply(patch, target.pid)
    message = str(e.value)
    assert "patches CPython 3.11.x, 3.12.1, 3.13.0" in message and "nothing was changed" in message
    assert MAPS_NAME not in Path(f"/proc/{target.pid}/maps").read_text()
    assert target.call(LONG) == ORIGINAL_LONG
