"""agent/events.py: JSON lines, history, queries, followers."""

from __future__ import annotations

import io
import json
import threading

from micropatch.agent.db import Database
from micropatch.agent.events import Event, EventFilter, EventLog


def test_events_go_to_the_stream_the_history_and_followers(tmp_path):
    stream = io.StringIO()
    log = EventLog(Database(tmp_path / "agent.db"), stream)
    seen: list[Event] = []
    log.add_sink(seen.append)
    with log.follow(EventFilter(kinds=("blocked",))) as q:
        log.record(Event("applied", 1.0, 10, "/bin/x", "fix", 1, "x", "applied fix"))
        log.record(Event("blocked", 2.0, 10, "/bin/x", "fix", 1, "x", "1 blocked", {"count": 1}))
        assert q.get_nowait().kind == "blocked" and q.empty()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["applied", "blocked"]
    assert lines[1]["data"] == {"count": 1} and lines[1]["pid"] == 10
    assert [e.kind for e in seen] == ["applied", "blocked"]
    history = log.query()
    assert history == seen
    assert log.query(EventFilter(kinds=("blocked",))) == [seen[1]]
    assert log.query(EventFilter(pid=11)) == []
    assert log.query(EventFilter(since=1.5)) == [seen[1]]
    assert log.query(limit=1) == [seen[1]]  # the last one
    # The history survives a new log on the same database (a restarted agent).
    assert EventLog(Database(tmp_path / "agent.db"), io.StringIO()).query() == seen


def test_record_is_thread_safe(tmp_path):
    log = EventLog(Database(tmp_path / "agent.db"), io.StringIO())

    def burst(n: int) -> None:
        for i in range(50):
            log.record(Event("agent", float(i), n, message=f"{n}-{i}"))

    threads = [threading.Thread(target=burst, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(log.query()) == 200


def test_event_json_round_trip():
    e = Event("crashed", 3.5, 7, "/bin/y", message="died", data={"signal": 11})
    assert Event.from_json(json.loads(json.dumps(e.to_json()))) == e


def test_the_line_comes_after_the_history_followers_and_sinks(tmp_path):
    """Whoever reads the line (the journal, a test) finds the event everywhere else."""
    seen_by_sink: list[str] = []

    class Stream(io.StringIO):
        def write(self, text: str) -> int:
            at_write.append((
                [e.kind for e in log.query()], list(seen_by_sink),
                [e.kind for e in list(q.queue) if e is not None],
            ))  # fmt: skip
            return super().write(text)

    at_write: list[tuple[list[str], list[str], list[str]]] = []
    log = EventLog(Database(tmp_path / "agent.db"), Stream())
    log.add_sink(lambda e: seen_by_sink.append(e.kind))
    with log.follow() as q:
        log.record(Event("blocked", 1.0, 10, message="1 blocked", data={"count": 1}))
    assert at_write == [(["blocked"], ["blocked"], ["blocked"])]
