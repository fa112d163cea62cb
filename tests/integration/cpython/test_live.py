"""The CPython runtime on real interpreters: apply, remove and update are in force
on return, for every reference to a function, whatever the threads are doing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from micropatch.errors import (
    AlreadyApplied,
    CodeMismatch,
    ModuleNotImported,
    NoSafePoint,
    NotApplied,
)
from micropatch.runtimes.cpython import engine, states
from micropatch.runtimes.cpython.page import MAPS_NAME

from .conftest import GUARD, StartPy, make_py_patch

LONG = "x" * 60 + ":1"  # longer than parse_header's limit (40)
ORIGINAL_LONG = [repr(("x" * 60, "1"))] * 3 + ["62", "True"]
BLOCKED_LONG = ["ERR ValueError: header too long"] * 3 + ["62", "True"]
SHORT = ["('a', '1')"] * 3 + ["3", "True"]


def test_only_thread_blocked_on_stdin(start_py: StartPy, shop: Path, python: str) -> None:
    target = start_py()
    assert target.call(LONG) == ORIGINAL_LONG
    patch = make_py_patch(shop, python)
    outcome = engine.apply(patch, target.pid)
    assert outcome.action == "applied" and outcome.sites == 1
    # In force on return: every reference (module attribute, `from m import f`
    # copy, callback in a dict) runs the guard; other calls are unchanged.
    assert target.call(LONG) == BLOCKED_LONG
    assert target.call("a:1") == SHORT
    [state] = states.status(target.pid)
    assert (state.patch_id, state.version, state.sites) == ("hdr-fix", 1, ("parse_header",))
    assert state.blocked == 3


def test_remove_restores_the_original_code_object(
    start_py: StartPy, shop: Path, python: str
) -> None:
    target = start_py()
    original = target.ask("code")
    engine.apply(make_py_patch(shop, python), target.pid)
    assert target.ask("code") != original
    outcome = engine.remove("hdr-fix", target.pid)
    assert outcome.action == "removed"
    assert target.ask("code") == original  # the very object, kept alive in the process
    assert target.call(LONG) == ORIGINAL_LONG
    assert states.status(target.pid) == []
    with pytest.raises(NotApplied):
        engine.remove("hdr-fix", target.pid)


def test_update_replaces_and_remove_restores(start_py: StartPy, shop: Path, python: str) -> None:
    target = start_py()
    original = target.ask("code")
    engine.apply(make_py_patch(shop, python), target.pid)
    v2 = make_py_patch(shop, python, [{
        "at": "parse_header", "when": "len(line) > limit",
        "then": "return ('too-long', '')",
    }], version=2)  # fmt: skip
    with pytest.raises(AlreadyApplied):
        engine.apply(v2, target.pid)
    outcome = engine.update(v2, target.pid)
    assert outcome.action == "updated" and outcome.version == 2
    assert target.call(LONG)[:3] == [repr(("too-long", ""))] * 3
    [state] = states.status(target.pid)
    assert state.version == 2
    engine.remove("hdr-fix", target.pid)
    assert target.ask("code") == original


def test_class_method_and_bound_method(start_py: StartPy, shop: Path, python: str) -> None:
    target = start_py()
    patch = make_py_patch(shop, python, [
        {"at": "Parser.feed", "when": "len(data) > 10", "then": "return -1"},
        {"at": "Parser.check", "python": "def check(cls, data):\n    return False\n"},
    ], id="parser-fix")  # fmt: skip
    engine.apply(patch, target.pid)
    assert target.call(LONG)[3:] == ["-1", "False"]  # a bound method made before the apply
    assert target.call("a:1")[3:] == ["3", "False"]
    engine.remove("parser-fix", target.pid)
    assert target.call(LONG) == ORIGINAL_LONG


@pytest.mark.parametrize(
    "workers", ["busy:2", "sleep:2", "cloop:2", "gil:1", "busy:1,sleep:1,cloop:1,gil:1"]
)
def test_threads_busy_sleeping_or_in_c(
    start_py: StartPy, shop: Path, python: str, workers: str
) -> None:
    target = start_py("--workers", workers)
    engine.apply(make_py_patch(shop, python), target.pid)
    assert target.call(LONG) == BLOCKED_LONG
    engine.remove("hdr-fix", target.pid)
    assert target.call(LONG) == ORIGINAL_LONG


def test_every_thread_sleeping(start_py: StartPy, shop: Path, python: str) -> None:
    target = start_py("--main", "sleep", "--workers", "sleep:2")
    assert target.call_by_signal(LONG) == ORIGINAL_LONG
    engine.apply(make_py_patch(shop, python), target.pid)
    assert target.call_by_signal(LONG) == BLOCKED_LONG
    engine.remove("hdr-fix", target.pid)
    assert target.call_by_signal(LONG) == ORIGINAL_LONG


def test_main_thread_running_python_no_thread_parked(
    start_py: StartPy, shop: Path, python: str
) -> None:
    target = start_py("--main", "busy", "--workers", "busy:1")
    outcome = engine.apply(make_py_patch(shop, python), target.pid)
    assert "pending call" in outcome.entered
    assert target.call_by_signal(LONG) == BLOCKED_LONG
    engine.remove("hdr-fix", target.pid)
    assert target.call_by_signal(LONG) == ORIGINAL_LONG


def test_identity_mismatch_changes_nothing(start_py: StartPy, shop: Path, python: str) -> None:
    target = start_py()
    original = target.ask("code")
    patch = make_py_patch(shop, python)
    # The process runs another build of the module: same name, other source.
    other = shop.parent / (shop.name + "-other")
    (other / "shop").mkdir(parents=True)
    (other / "shop" / "__init__.py").write_text("")
    text = (shop / "shop" / "parsers.py").read_text().replace("limit=40", "limit=50")
    (other / "shop" / "parsers.py").write_text(text)
    changed = start_py(module_dir=other)
    with pytest.raises(CodeMismatch, match=r"shop\.parsers") as e:
        engine.apply(patch, changed.pid)
    assert "nothing was changed" in str(e.value) and e.value.pid == changed.pid
    assert "after the process started" not in str(e.value)  # it was like that before
    assert states.status(changed.pid) == []
    assert changed.call(LONG)[:3] == [repr(("x" * 60, "1"))] * 3
    assert target.ask("code") == original


def test_a_module_file_replaced_after_the_start_is_said(
    start_py: StartPy, shop: Path, python: str
) -> None:
    """An upgrade on disk without a restart: the process runs the code it imported,
    the file is another; the refusal says the file changed after the process started."""
    patch = make_py_patch(shop, python)
    target = start_py()
    parsers = shop / "shop" / "parsers.py"
    parsers.write_text(parsers.read_text() + "\n# 1.0.1\n")
    later = time.time() + 2  # past the second the boot time is known to
    os.utime(parsers, (later, later))
    with pytest.raises(CodeMismatch, match=r"its source .*parsers\.py has SHA-256") as e:
        engine.apply(patch, target.pid)
    message = str(e.value)
    assert "after the process started" in message and "restart the process" in message, message
    assert "nothing was changed" in message and states.status(target.pid) == []
    assert target.call(LONG) == ORIGINAL_LONG


def test_module_not_imported_is_refused(start_py: StartPy, shop: Path, python: str) -> None:
    target = start_py()
    (shop / "shop" / "missing.py").write_text((shop / "shop" / "parsers.py").read_text())
    patch = make_py_patch(shop, python, file="missing.py", module="shop.missing", id="missing-fix")
    with pytest.raises(ModuleNotImported, match=r"shop\.missing") as e:
        engine.apply(patch, target.pid)
    assert "not imported" in str(e.value) and "nothing was changed" in str(e.value)
    assert (e.value.pid, e.value.module) == (target.pid, "shop.missing")
    assert states.status(target.pid) == []
    # Read from its sys.modules: no page mapped, nothing run in it.
    assert MAPS_NAME not in Path(f"/proc/{target.pid}/maps").read_text()
    assert target.call(LONG) == ORIGINAL_LONG


def test_guard_on_a_missing_function_fails_at_build(shop: Path, python: str) -> None:
    from micropatch.errors import MicropatchError

    with pytest.raises(MicropatchError, match="nothere"):
        make_py_patch(shop, python, [{**GUARD, "at": "nothere"}])


def test_gil_held_forever_is_a_bounded_error(start_py: StartPy, shop: Path, python: str) -> None:
    target = start_py()
    original = target.ask("code")
    assert target.ask("hold 4") == "holding"
    time.sleep(0.2)  # in the C loop, holding the GIL
    started = time.monotonic()
    with pytest.raises(NoSafePoint, match="nothing was changed") as e:
        engine.apply(make_py_patch(shop, python), target.pid, timeout=1.0)
    assert time.monotonic() - started < 3.5
    assert e.value.pid == target.pid
    assert target.read_line() == "released"
    assert target.call(LONG) == ORIGINAL_LONG  # and it never takes effect later
    assert states.status(target.pid) == []
    assert target.ask("code") == original
