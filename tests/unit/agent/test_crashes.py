"""CrashTracker (agent/crashes.py): pure bookkeeping."""

from __future__ import annotations

import pytest

from micropatch.agent.crashes import CrashTracker


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
