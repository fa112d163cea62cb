"""What the agent sends at check-in (agent/fleet/report.py): every item checked on its
own against the server's schema (server/schemas.py) — one bad item never costs the
rest — and only the patches of the store, on the processes the policy covers."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from micropatch.agent.covered import Covered
from micropatch.agent.db import Database
from micropatch.agent.events import Event, EventLog
from micropatch.agent.fleet import report
from micropatch.agent.policy import Exclusion, PolicyView
from micropatch.patch.model import VERSION_MAX
from micropatch.process.select import read_info
from micropatch.server import schemas

anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=300),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)  # fmt: skip
texts = st.none() | st.text(max_size=1100) | st.sampled_from(["", "a\x00b", "x" * 5000])
numbers = st.none() | st.integers(min_value=-(2**70), max_value=2**70) | st.booleans() | st.floats()


@settings(max_examples=300, deadline=None)
@given(name=texts, path=texts, build_id=texts | st.sampled_from(["ab" * 20, "AB", "ab" * 70]),
       sha256=texts | st.sampled_from(["0" * 64, "0" * 63]))  # fmt: skip
def test_a_module_is_sent_valid_or_not_at_all(name, path, build_id, sha256) -> None:
    item = report.module_item({"name": name, "path": path, "build_id": build_id, "sha256": sha256})
    if item is not None:
        schemas.ModuleIn.model_validate(item)
    if isinstance(name, str) and name and sha256 == "0" * 64:
        assert item is not None  # nothing else makes it unsendable


@settings(max_examples=300, deadline=None)
@given(pid=numbers, exe=texts, unit=texts, user=texts,
       patches=st.lists(st.fixed_dictionaries({"patch_id": texts, "version": numbers,
                                               "state": texts}), max_size=4))  # fmt: skip
def test_a_process_is_sent_valid_or_not_at_all(pid, exe, unit, user, patches) -> None:
    item = report.process_item({"pid": pid, "exe": exe, "unit": unit, "user": user,
                                "patches": patches})  # fmt: skip
    if item is not None:
        schemas.ProcessIn.model_validate(item)


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(["applied", "blocked", "nonsense"]) | texts, when=numbers,
       pid=numbers, version=numbers, message=texts, data=anything)  # fmt: skip
def test_an_event_is_sent_valid_or_not_at_all(kind, when, pid, version, message, data) -> None:
    item = report.event_item({"kind": kind, "time": when, "pid": pid, "version": version,
                              "message": message, "data": data, "exe": "/x\x00"})  # fmt: skip
    if item is not None:
        schemas.EventIn.model_validate(item)


def test_versions_are_63_bit_on_both_sides() -> None:
    assert report.VERSION_MAX == schemas.VERSION_MAX == 2**63 - 1
    patches = [{"patch_id": "a", "version": 2**31}, {"patch_id": "b", "version": 2**63 - 1},
               {"patch_id": "c", "version": 2**63}, {"patch_id": "d", "version": -1}]  # fmt: skip
    item = report.process_item({"pid": 7, "patches": patches})
    assert item is not None
    assert [(p["patch_id"], p["version"]) for p in item["patches"]] == [("a", 2**31), ("b", VERSION_MAX)]  # fmt: skip
    schemas.ProcessIn.model_validate(item)
    event = report.event_item({"kind": "applied", "time": 1.0, "version": 2**31})
    assert event is not None and schemas.EventIn.model_validate(event).version == 2**31


def _covered(pid: int, exe: str, patches: dict[str, int]) -> Covered:
    return Covered(pid, 1, exe, dict(patches))


def test_only_the_stores_patches_on_processes_the_policy_covers() -> None:
    me = read_info(os.getpid())
    covered = [_covered(me.pid, me.exe, {"mine": 2**31, "by-hand": 5}),
               _covered(2**22 + 7, "/gone", {"mine": 1})]  # fmt: skip
    sent = report.processes(covered, {"mine", "other"}, PolicyView())
    assert [(p["pid"], p["patches"]) for p in sent] == [
        (me.pid, [{"patch_id": "mine", "version": 2**31, "state": "applied"}])]  # fmt: skip
    excluded = PolicyView(exclusions=(Exclusion("exe", me.exe, "mine"),))
    assert report.processes(covered, {"mine"}, excluded) == []
    pinned = PolicyView(exclusions=excluded.exclusions, pins={("mine", me.pid): True})
    assert [p["pid"] for p in report.processes(covered, {"mine"}, pinned)] == [me.pid]


def test_events_of_the_store_and_of_covered_processes_go_one_by_one(tmp_path: Path) -> None:
    me = read_info(os.getpid())
    db = Database(tmp_path / "agent.db")
    log = EventLog(db, io.StringIO())
    now = time.time()

    def record(kind: str, message: str, **fields: Any) -> None:
        log.record(Event(kind, now, message=message, **fields))

    record("blocked", "by hand", pid=me.pid, patch_id="by-hand", version=1)
    record("blocked", "mine", pid=me.pid, exe=me.exe, patch_id="mine", version=2**63 - 1)
    record("blocked", "mine, elsewhere", pid=2**22 + 7, exe="/opt/excluded/x", patch_id="mine")
    record("disabled", "revoked and dropped", patch_id="dropped", version=3)
    record("applied", "negative", pid=me.pid, patch_id="mine", version=-1)
    record("agent", "ready", pid=me.pid)
    with db.write() as c:  # a row an older agent may have left: a kind no server knows
        c.execute("INSERT INTO events (time, kind, message, data) VALUES (?, 'odd', '', '{}')",
                  (now,))  # fmt: skip
    view = PolicyView(exclusions=(Exclusion("exe", "/opt/excluded/*", "mine"),))
    events, cursor, bad = report.events(db, 0, {"mine"}, view)
    assert [e["message"] for e in events] == ["mine", "revoked and dropped", "negative", "ready"]
    assert [e["version"] for e in events] == [2**63 - 1, 3, None, None]
    assert (cursor, bad) == (7, 1)  # past everything, sent or not
    for e in events:
        schemas.EventIn.model_validate(e)
    assert report.events(db, cursor, {"mine"}, view) == ([], 7, 0)
    log.close()
    db.close()
