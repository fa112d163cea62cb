"""How `micropatch agent events` prints one event."""

from __future__ import annotations

from micropatch.cli.agent import _show_event


def test_the_pid_is_said_once(capsys) -> None:
    _show_event(
        {"time": 0, "kind": "late", "pid": 18, "message": "pid 18 (/x/svc) mapped libfoo"}, False
    )
    _show_event({"time": 0, "kind": "crashed", "pid": 19, "message": "killed by SIGSEGV"}, False)
    first, second = capsys.readouterr().out.splitlines()
    assert first.count("pid 18") == 1 and first.endswith("late     pid 18 (/x/svc) mapped libfoo")
    assert second.endswith("crashed  pid 19 killed by SIGSEGV")
