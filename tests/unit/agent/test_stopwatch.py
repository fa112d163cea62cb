"""agent/stopwatch.py: the agent starts its stop watchdog, reports the previous agent's
end by it once, and says so when the watchdog cannot start."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from micropatch.agent.events import Event
from micropatch.agent.stopwatch import RECORD, StopWatch
from micropatch.process.watchdog import VARIABLE


def test_the_previous_agents_end_is_one_watchdog_event(tmp_path: Path, monkeypatch) -> None:
    said = {"patcher": 41, "pid": 7, "what": "the stop of process 7 (nginx) (apply fix-1)",
            "held": 5.01, "limit": 5.0, "time": 1700000000.0}  # fmt: skip
    (tmp_path / RECORD).write_text(json.dumps(said))
    events: list[Event] = []
    monkeypatch.delenv(VARIABLE, raising=False)
    watch = StopWatch(3.0, tmp_path, events.append)
    watch.start()
    try:
        assert os.environ[VARIABLE].startswith(f"{os.getpid()}:")
    finally:
        watch.stop()
    assert VARIABLE not in os.environ
    [event] = events
    assert (event.kind, event.pid, event.time) == ("watchdog", 7, 1700000000.0)
    assert event.data == {"held": 5.01, "limit": 5.0, "patcher": 41}
    assert (
        "the previous agent (pid 41) was killed by its stop watchdog: the stop of "
        "process 7 (nginx) (apply fix-1) held its threads 5.0 s" in event.message
    )
    assert not (tmp_path / RECORD).exists()
    again = StopWatch(3.0, tmp_path, events.append)
    again.start()
    again.stop()
    assert len(events) == 1  # nothing to report a second time


def test_a_watchdog_that_cannot_start_is_an_agent_event(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "executable", "/nonexistent/python3")
    monkeypatch.delenv(VARIABLE, raising=False)
    events: list[Event] = []
    watch = StopWatch(3.0, tmp_path, events.append)
    watch.start()
    watch.stop()
    [event] = events
    assert event.kind == "agent" and event.message.startswith("stop watchdog not started (")
    assert VARIABLE not in os.environ
