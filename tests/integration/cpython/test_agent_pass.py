"""The agent's Python pass on real interpreters: applies a stored Python patch to
the interpreters that imported its module (and to one that imports it later, at
the next pass), follows the policy (disable removes, exclusions), updates to a
newer version, reports events and blocked counts; an interpreter without the
module is never touched."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path

from micropatch.agent.db import Database
from micropatch.agent.events import Event
from micropatch.agent.policy import exclusion
from micropatch.agent.pythonpass import PythonPass
from micropatch.agent.store import PolicyState
from micropatch.runtimes.cpython import states
from micropatch.runtimes.cpython.page import MAPS_NAME
from micropatch.trust.admission import AdmittedPython

from .conftest import PyTarget, StartPy, make_py_patch
from .test_live import BLOCKED_LONG, LONG, ORIGINAL_LONG

# An interpreter that imports shop.parsers only when asked (a line on stdin).
LATE = """\
import sys
sys.path.insert(0, sys.argv[1])
print("ready 0", flush=True)
for line in sys.stdin:
    import shop.parsers
    try:
        print(repr(shop.parsers.parse_header(line.strip())), flush=True)
    except Exception as e:
        print(f"ERR {type(e).__name__}: {e}", flush=True)
"""


def _pass(
    tmp_path: Path, patches: dict[str, AdmittedPython]
) -> tuple[PythonPass, PolicyState, list[Event]]:
    state = PolicyState(Database(tmp_path / "agent.db"))
    for patch_id in patches:
        state.ensure(patch_id, "enabled")
    events: list[Event] = []
    python_pass = PythonPass(
        lambda: dict(patches), lambda patch_id: patches[patch_id], state, events.append,
        ops=threading.BoundedSemaphore(1),
    )  # fmt: skip
    return python_pass, state, events


def _kinds(events: list[Event]) -> list[tuple[str, int | None, str | None]]:
    return [(e.kind, e.pid, e.patch_id) for e in events]


def test_pass_applies_follows_policy_and_updates(
    start_py: StartPy, shop: Path, python: str, tmp_path: Path
) -> None:
    target = start_py()
    bare = start_py("--bare")
    patches = {"hdr-fix": make_py_patch(shop, python)}
    python_pass, state, events = _pass(tmp_path, patches)
    pids = [target.pid, bare.pid]

    assert python_pass.run(pids)["applied"] == 1
    assert _kinds(events) == [("applied", target.pid, "hdr-fix")]
    assert events[0].module == "shop.parsers" and events[0].data["runtime"] == "cpython"
    assert target.call(LONG) == BLOCKED_LONG
    assert MAPS_NAME not in Path(f"/proc/{bare.pid}/maps").read_text()  # never touched
    assert {"name": "shop.parsers", "path": str(shop / "shop" / "parsers.py"),
            "build_id": None, "sha256": patches["hdr-fix"].artifact.payload.module.sha256,
            } in python_pass.modules()  # fmt: skip

    events.clear()
    assert python_pass.run(pids)["applied"] == 0  # the registry says it is there
    [blocked] = events
    assert (blocked.kind, blocked.data["count"]) == ("blocked", 3)

    events.clear()
    state.set_state("hdr-fix", "disabled")
    assert python_pass.run(pids)["removed"] == 1
    assert _kinds(events) == [("removed", target.pid, "hdr-fix")]
    assert target.call(LONG) == ORIGINAL_LONG and states.status(target.pid) == []

    state.set_state("hdr-fix", "enabled")
    state.exclude(exclusion("exe", str(Path(python).resolve())))
    state.exclude(exclusion("exe", python))
    assert python_pass.run(pids)["applied"] == 0  # excluded
    for e in state.exclusions():
        state.unexclude(e)
    assert python_pass.run(pids)["applied"] == 1

    events.clear()
    patches["hdr-fix"] = make_py_patch(shop, python, [{
        "at": "parse_header", "when": "len(line) > limit", "then": "return ('too-long', '')",
    }], version=2)  # fmt: skip
    assert python_pass.run(pids)["updated"] == 1
    assert [(e.kind, e.version) for e in events] == [("updated", 2)]
    assert target.call(LONG)[:3] == [repr(("too-long", ""))] * 3


def test_a_module_imported_later_is_patched_at_the_next_pass(
    shop: Path, python: str, tmp_path: Path
) -> None:
    script = tmp_path / "late.py"
    script.write_text(LATE)
    proc = subprocess.Popen([python, str(script), str(shop)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        late = PyTarget(proc, shop)
        late.pid = proc.pid
        python_pass, _, events = _pass(tmp_path, {"hdr-fix": make_py_patch(shop, python)})
        assert python_pass.run([proc.pid])["applied"] == 0  # not imported: nothing done
        assert MAPS_NAME not in Path(f"/proc/{proc.pid}/maps").read_text()
        assert late.ask(LONG) == repr(("x" * 60, "1"))  # imports it, runs the original
        assert python_pass.run([proc.pid])["applied"] == 1
        assert late.ask(LONG) == "ERR ValueError: header too long"
        assert _kinds(events) == [("applied", proc.pid, "hdr-fix")]
    finally:
        proc.kill()
        proc.wait()
