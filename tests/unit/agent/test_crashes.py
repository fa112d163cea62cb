"""CrashTracker and Carried (agent/crashes.py): pure bookkeeping."""

from __future__ import annotations

import signal

import pytest

from micropatch.agent.crashes import Carried, CrashTracker, on_exit
from micropatch.process.connector import ExitEvent


def test_the_limit_trips_once_per_patch_and_exe() -> None:
    tracker = CrashTracker(limit=3, window=60)
    assert tracker.record("/bin/a", ["p1", "p2"], 0) == []
    assert tracker.record("/bin/a", ["p1"], 1) == []
    assert tracker.record("/bin/a", ["p1", "p2"], 2) == ["p1"]  # p2 has 2
    assert tracker.record("/bin/a", ["p1", "p2"], 3) == ["p2"]  # p1 not again
    assert tracker.record("/bin/a", ["p1", "p2"], 4) == []
    assert tracker.count("p1", "/bin/a", 4) == 0


def test_counts_are_per_exe() -> None:
    tracker = CrashTracker(limit=2, window=60)
    assert tracker.record("/bin/a", ["p"], 0) == []
    assert tracker.record("/bin/b", ["p"], 1) == []
    assert tracker.record("/bin/b", ["p"], 2) == ["p"]
    assert tracker.count("p", "/bin/a", 2) == 1
    assert tracker.record("/bin/a", ["p"], 3) == ["p"]


def test_the_window_slides() -> None:
    tracker = CrashTracker(limit=3, window=10)
    assert tracker.record("/x", ["p"], 0) == []
    assert tracker.record("/x", ["p"], 5) == []
    assert tracker.record("/x", ["p"], 10.5) == []  # the crash at 0 has left the window
    assert tracker.count("p", "/x", 10.5) == 2
    assert tracker.record("/x", ["p"], 15) == ["p"]  # 5, 10.5, 15: exactly 10 s
    assert tracker.count("p", "/x", 15) == 0


def test_a_limit_of_one_trips_at_the_first_crash_and_duplicates_count_once() -> None:
    tracker = CrashTracker(limit=1, window=1)
    assert tracker.record("/x", ["p", "p", "q"], 0) == ["p", "q"]
    assert tracker.record("/x", ["p", "q"], 0) == []


def test_reset_lets_a_pair_trip_again() -> None:
    tracker = CrashTracker(limit=2, window=60)
    tracker.record("/a", ["p"], 0)
    assert tracker.record("/a", ["p"], 1) == ["p"]
    tracker.record("/b", ["p"], 1)
    tracker.reset("p", "/a")
    assert tracker.count("p", "/b", 1) == 1  # another exe is untouched
    assert tracker.record("/a", ["p"], 2) == []
    assert tracker.record("/a", ["p"], 3) == ["p"]
    tracker.reset("p")
    assert tracker.count("p", "/b", 3) == 0


def test_prune_drops_old_pairs() -> None:
    tracker = CrashTracker(limit=5, window=10)
    tracker.record("/a", ["p"], 0)
    tracker.prune(100)
    assert tracker._crashes == {}


@pytest.mark.parametrize(("limit", "window"), [(0, 10), (-1, 10), (3, 0), (3, -5)])
def test_bad_settings_are_refused(limit: int, window: float) -> None:
    with pytest.raises(ValueError, match="crash_"):
        CrashTracker(limit, window)


def test_carried_follows_apply_remove_and_scan() -> None:
    carried = Carried()
    carried.add(10, "/bin/a", "p1", since_ns=100)
    carried.add(10, "/bin/a", "p2", since_ns=200)
    assert carried[10].patches == {"p1", "p2"}
    assert carried[10].since_ns == 100  # the first patching: the process's entry
    exe, patches, _ = carried[10]
    assert (exe, patches) == ("/bin/a", {"p1", "p2"})
    carried.discard(10, "p1")
    assert carried[10].patches == {"p2"}
    carried.discard(10, "p2")
    assert 10 not in carried
    carried.discard(10, "p2")  # nothing: no error
    carried.set(11, "/bin/b", ["p3"])
    carried.set(12, "/bin/b", [])
    assert len(carried) == 1
    carried.set(11, "/bin/b", [])
    assert len(carried) == 0


def test_an_exec_replaces_the_exe() -> None:
    carried = Carried()
    carried.add(10, "/bin/a", "p1")
    carried.add(10, "/bin/b", "p2")  # the pid exec'd another program
    assert carried[10].exe == "/bin/b"
    assert carried[10].patches == {"p2"}


def test_forget_returns_what_the_process_carried_once() -> None:
    carried = Carried()
    carried.set(10, "/bin/a", ["p1"], since_ns=100)
    entry = carried.forget(10, exited_ns=500)
    assert entry is not None and entry.patches == {"p1"}
    assert carried.forget(10) is None


def test_forget_keeps_a_newer_process_with_the_same_pid() -> None:
    carried = Carried()
    carried.set(10, "/bin/new", ["p1"], since_ns=1000)
    assert carried.forget(10, exited_ns=900) is None  # the old process's exit, read late
    assert carried[10].exe == "/bin/new"


def _exit(pid: int, tgid: int, code: int, stamp: int = 10**12) -> ExitEvent:
    return ExitEvent(pid, tgid, code, signal.SIGCHLD, timestamp_ns=stamp)


def test_on_exit_reports_a_crash_of_a_patched_process() -> None:
    carried = Carried()
    carried.set(10, "/bin/a", ["p1", "p2"], since_ns=5)
    crash = on_exit(carried, _exit(10, 10, signal.SIGSEGV | 0x80))
    assert crash is not None
    assert (crash.pid, crash.exe, crash.patches) == (10, "/bin/a", {"p1", "p2"})
    assert crash.signal == signal.SIGSEGV and crash.core_dumped
    assert 10 not in carried


def test_on_exit_ignores_threads_normal_exits_kills_and_unpatched() -> None:
    carried = Carried()
    for pid in (10, 11, 12):
        carried.set(pid, "/bin/a", ["p"], since_ns=5)
    assert on_exit(carried, _exit(13, 10, signal.SIGSEGV)) is None  # a thread
    assert 10 in carried
    assert on_exit(carried, _exit(10, 10, 1 << 8)) is None  # exit(1)
    assert on_exit(carried, _exit(11, 11, signal.SIGKILL)) is None
    assert on_exit(carried, _exit(99, 99, signal.SIGSEGV)) is None  # not patched
    assert 10 not in carried and 11 not in carried and 12 in carried


def test_crashes_feed_the_tracker() -> None:
    carried, tracker = Carried(), CrashTracker(limit=2, window=60)
    disabled = []
    for n, pid in enumerate((20, 21)):
        carried.set(pid, "/bin/a", ["p"], since_ns=5)
        crash = on_exit(carried, _exit(pid, pid, signal.SIGABRT))
        assert crash is not None
        disabled += tracker.record(crash.exe, crash.patches, float(n))
    assert disabled == ["p"]
