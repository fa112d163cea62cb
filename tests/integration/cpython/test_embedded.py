"""A program that embeds libpython (as uwsgi does): before it initializes Python it
has imported nothing, which is read as such (not as an unreadable process that
fails `apply --all`), and apply is refused from its memory; once initialized it is
patched like any interpreter."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from micropatch.errors import ModuleNotImported
from micropatch.process.select import Filters
from micropatch.runtimes import engines
from micropatch.runtimes.cpython import engine, states
from micropatch.runtimes.cpython.imports import has_module, imported
from micropatch.runtimes.cpython.page import MAPS_NAME

from .conftest import HERE, PyTarget, make_py_patch
from .test_live import BLOCKED_LONG, LONG, ORIGINAL_LONG

DEBIAN = "/usr/bin/python3.11"  # its libpython3.11.so is what the program links


@pytest.fixture(scope="module")
def embed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = Path(f"{DEBIAN}-config")
    if not config.exists():
        pytest.skip(f"{config} (the headers and libpython to embed) is not installed")
    flags = subprocess.run([str(config), "--embed", "--includes", "--ldflags"],
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    out = tmp_path_factory.mktemp("embed") / "embed"
    subprocess.run(["cc", "-O1", "-o", str(out), str(HERE / "embed.c"), *flags], check=True)
    return out


@pytest.fixture
def waiting(embed: Path, shop: Path, clib: Path) -> Iterator[subprocess.Popen[str]]:
    """The program, mapping libpython, blocked in fgets() before Py_Initialize."""
    proc = subprocess.Popen(
        [str(embed), str(HERE / "pyshop.py"), str(shop), "--clib", str(clib)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("waiting ")
    yield proc
    proc.kill()
    proc.wait()


def test_before_python_is_initialized_nothing_is_imported_and_apply_is_refused(
    waiting: subprocess.Popen[str], embed: Path, shop: Path, python: str
) -> None:
    if python != DEBIAN:
        pytest.skip(f"the program embeds {DEBIAN}'s libpython; the suite runs {python}")
    pid = waiting.pid
    assert "libpython3.11.so" in Path(f"/proc/{pid}/maps").read_text()
    found = imported(pid)
    assert (found.version, found.modules) == ("3.11.2", {})
    assert not has_module(pid, "shop.parsers")
    patch = make_py_patch(shop, python)
    with pytest.raises(ModuleNotImported, match=r"shop\.parsers is not imported") as e:
        engine.apply(patch, pid)
    assert "nothing was changed" in str(e.value)
    assert MAPS_NAME not in Path(f"/proc/{pid}/maps").read_text()
    # `apply --all` passes over it (it failed as "cannot read its patches").
    assert pid in states.interpreter_pids("3.11")
    selection = engines.select("apply", patch.id, patch, Filters.of([str(embed)], (), (), ()))
    assert (selection.unreadable, selection.targets, selection.gone) == ([], [], 0)

    # Initialized, it runs pyshop.py: patched and restored like any interpreter.
    assert waiting.stdin is not None
    waiting.stdin.write("go\n")
    waiting.stdin.flush()
    target = PyTarget(waiting, shop)
    assert target.pid == pid and has_module(pid, "shop.parsers")
    engine.apply(patch, pid)
    assert target.call(LONG) == BLOCKED_LONG
    engine.remove("hdr-fix", pid)
    assert target.call(LONG) == ORIGINAL_LONG
    assert states.status(pid) == []
