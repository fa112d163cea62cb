"""Every supported CPython found on this machine (Debian's 3.11, pyenv's shared
builds of 3.11, 3.12, 3.13), and a clear refusal of an unsupported one.
MICROPATCH_TEST_PYTHON runs the whole suite on one of them."""

from __future__ import annotations

from pathlib import Path

import pytest

from micropatch.errors import InterpreterError
from micropatch.runtimes.cpython import engine, states
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
