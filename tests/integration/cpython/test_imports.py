"""Reading which modules a running interpreter imported, from its memory only: on
every supported CPython installed here, with the interpreter running threads."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from micropatch.errors import InterpreterError
from micropatch.runtimes.cpython.imports import has_module, imported
from micropatch.runtimes.cpython.page import MAPS_NAME

from .conftest import StartPy
from .test_versions import SUPPORTED, _present


@pytest.mark.parametrize("interpreter", SUPPORTED)
def test_imported_modules_and_their_files(start_py: StartPy, shop: Path, interpreter: str) -> None:
    python = _present(interpreter)
    target = start_py("--workers", "busy:1,sleep:1", interpreter=python)
    bare = start_py("--bare", interpreter=python)
    found = imported(target.pid, ["shop.parsers", "shop", "sys", "absent.module"])
    assert found.version.startswith(Path(python).name.removeprefix("python"))
    assert found.modules == {
        "shop.parsers": str(shop / "shop" / "parsers.py"),
        "shop": str(shop / "shop" / "__init__.py"),
        "sys": None,  # built in: no file
    }
    everything = imported(target.pid).modules
    assert {"json", "threading", "shop.parsers"} <= set(everything)
    assert has_module(target.pid, "shop.parsers")
    assert not has_module(bare.pid, "shop.parsers")
    # Read without touching either process: no page, and both still answer.
    for t in (target, bare):
        assert MAPS_NAME not in Path(f"/proc/{t.pid}/maps").read_text()
    assert bare.ask("x") == "bare"
    assert target.call("a:1")[0] == "('a', '1')"


def test_a_process_that_is_not_python_is_refused() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        with pytest.raises(InterpreterError, match="not a CPython interpreter"):
            imported(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def test_inventory_of_interpreters_and_module_sources(start_py: StartPy, shop: Path) -> None:
    import hashlib

    from micropatch.runtimes.cpython.inventory import PythonInventory

    target = start_py("--workers", "sleep:1")
    other = subprocess.Popen(["sleep", "30"])
    try:
        inventory = PythonInventory()
        [found] = inventory.interpreters([target.pid, other.pid])  # `sleep` is no Python
        source = shop / "shop" / "parsers.py"
        assert found.pid == target.pid and found.minor in ("3.11", "3.12", "3.13")
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        assert found.modules["shop.parsers"].path == str(source)
        assert found.modules["shop.parsers"].sha256 == digest
        assert "sys" not in found.modules  # no source file
        rows = inventory.modules([found])
        assert {"name": "shop.parsers", "path": str(source), "build_id": None,
                "sha256": digest} in rows  # fmt: skip
        assert MAPS_NAME not in Path(f"/proc/{target.pid}/maps").read_text()
    finally:
        other.kill()
        other.wait()


CHURN = """\
import sys, threading, time, types, json
def churn():
    i = 0
    while True:
        if i % 4 == 0:
            time.sleep(0.0005)
        name = f"churn{i % 5000}"
        if name in sys.modules:
            del sys.modules[name]
        else:
            sys.modules[name] = types.ModuleType(name)
        i += 1
threading.Thread(target=churn, daemon=True).start()
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_sys_modules_that_changes_while_read(python: str) -> None:
    """A thread adds and deletes modules (thousands a second, resizing the dict) while
    it is read: each read gives the modules that stay, or says the dict kept changing
    (never a wrong answer, e.g. a table caught half copied by a resize)."""
    from micropatch.errors import MemoryAccessError

    proc = subprocess.Popen([python, "-c", CHURN], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
        read = torn = 0
        for _ in range(40):
            try:
                found = imported(proc.pid, ["json", "sys", "threading"]).modules
            except MemoryAccessError:
                torn += 1
                continue
            assert set(found) == {"json", "sys", "threading"}, found
            read += 1
        assert read >= 1, (read, torn)
    finally:
        proc.kill()
        proc.wait()
