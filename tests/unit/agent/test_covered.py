"""Carriers (agent/covered.py): what each process carries, between passes, through
operations, forks, execs and exits; the times decide which event is about which
image or process (the proc connector's CLOCK_MONOTONIC nanoseconds)."""

from __future__ import annotations

import pytest

from micropatch.agent import covered
from micropatch.agent.covered import Carriers


def carriers() -> Carriers:
    return Carriers(lambda pid: 1000 + pid)  # every pid alive, its start time 1000 + pid


def test_operations_and_passes_keep_what_a_process_carries() -> None:
    c = carriers()
    c.pending(10, "/bin/a", "p1", 1)
    assert c.get(10) is not None and c.get(10).carried() == ["p1"]  # type: ignore[union-attr]
    c.note(10, "/bin/a", "applied", "p1", 1)
    c.note(10, "/bin/a", "applied", "p2", 3)
    got = c.get(10)
    assert got is not None and (got.patches, got.pending, got.start) == (
        {"p1": 1, "p2": 3},
        {},
        1010,
    )
    c.note(10, "/bin/a", "removed", "p1", 1)
    assert c.get(10).patches == {"p2": 3}  # type: ignore[union-attr]
    c.remember(10, 1010, "/bin/a", {}, {}, read_ns=5)  # a pass: it carries nothing
    assert c.get(10) is None
    c.pending(11, "/bin/a", "p1", 1)
    c.pending(11, "/bin/a", "p1", None)  # the apply failed
    assert c.get(11) is not None and c.get(11).carried() == []  # type: ignore[union-attr]


def test_a_forked_child_carries_its_parents_patches_and_counts() -> None:
    c = carriers()
    c.remember(10, 1010, "/usr/sbin/nginx", {"p1": 2}, {"p1": (0x1000,)}, read_ns=100)
    c.set_blocked(10, "p1", 4)
    child = c.forked(10, 20, ns=200)
    assert child is not None
    assert (child.exe, child.patches, child.blocked, child.parent, child.start) == (
        "/usr/sbin/nginx",
        {"p1": 2},
        {"p1": 4},
        10,
        1020,
    )
    assert c.forked(99, 21, ns=200) is None  # an unpatched parent: nothing to inherit
    assert c.get(21) is None
    c.pending(10, "/usr/sbin/nginx", "p2", 1)  # being applied when it forks: inherited too
    assert c.forked(10, 22, ns=10**15).carried() == ["p1", "p2"]  # type: ignore[union-attr]


def test_a_fork_older_than_what_the_parent_carries_inherits_nothing_of_it() -> None:
    c = carriers()
    c.remember(10, 1010, "/bin/a", {"p1": 1}, {}, read_ns=500)
    assert c.forked(10, 20, ns=400) is None  # forked before the patch was known there
    c.remember(20, 1020, "/bin/a", {"p1": 1}, {}, read_ns=600)  # a pass read the child
    kept = c.forked(10, 20, ns=550)  # the fork event, read late: the pass is fresher
    assert kept is not None and kept.parent is None and kept.since == {"p1": 600}


def test_an_exec_drops_the_old_images_patches_not_those_applied_at_the_exec() -> None:
    c = carriers()
    c.remember(10, 1010, "/bin/sh", {"p-sh": 1}, {}, read_ns=100)
    c.execed(10, ns=200)
    assert c.get(10) is None
    c.remember(11, 1011, "/bin/sh", {"p-sh": 1}, {}, read_ns=100)
    c.note(11, "/usr/bin/prog", "applied", "p-prog", 1)  # at the exec stop (now > 200)
    c.execed(11, ns=200)  # the connector's exec event, read after the apply
    got = c.get(11)
    assert got is not None and (got.exe, got.carried()) == ("/usr/bin/prog", ["p-prog"])


def test_an_exit_is_of_the_process_it_follows_not_of_a_newer_one_with_its_pid() -> None:
    c = carriers()
    c.remember(10, 1010, "/bin/new", {"p1": 1}, {}, read_ns=1000)
    assert c.forget(10, exited_ns=900) is None  # the old process's exit, read late
    assert c.get(10) is not None
    gone = c.forget(10, exited_ns=1100)
    assert gone is not None and gone.carried() == ["p1"]
    assert c.forget(10) is None


def test_a_child_gone_before_it_could_be_read_is_still_known_for_its_exit() -> None:
    c = Carriers(lambda pid: None if pid == 20 else 1000 + pid)
    c.remember(10, 1010, "/bin/a", {"p1": 1}, {}, read_ns=100)
    child = c.forked(10, 20, ns=200)
    assert child is not None and child.start == 0
    gone = c.forget(20, exited_ns=300)
    assert gone is not None and gone.parent == 10 and gone.exe == "/bin/a"


def test_retain() -> None:
    c = carriers()
    for pid in (1, 2, 3):
        c.remember(pid, 1000 + pid, "/x", {"p": 1}, {}, read_ns=1)
    c.retain(lambda entry: entry.pid == 2)
    assert list(c.all()) == [2]
    assert c.get(1) is not None  # buried: its exit event may still come, with its signal


def test_a_process_found_gone_waits_for_its_exit_event(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass that finds a patched process gone must not take from its exit event (read
    later by another thread) what it carried: the crash would go uncounted."""
    c = carriers()
    c.remember(10, 1010, "/bin/a", {"p1": 1}, {}, read_ns=1)
    c.bury(10)
    assert 10 not in c.all()  # no longer covered
    dead = c.forget(10, exited_ns=2)  # its exit event, after the pass
    assert dead is not None and dead.carried() == ["p1"]
    c.remember(11, 1011, "/bin/a", {"p1": 1}, {}, read_ns=1)
    c.bury(11)
    c.pending(11, "/bin/b", "p2", 1)  # the pid reused by a new process: a new entry
    got = c.get(11)
    assert got is not None and (got.exe, got.carried(), got.buried) == ("/bin/b", ["p2"], None)
    c.remember(12, 1012, "/bin/a", {"p1": 1}, {}, read_ns=1)
    c.bury(12)
    monkeypatch.setattr(covered, "EXIT_GRACE_NS", -1)
    c.retain(lambda entry: True)  # no exit event within the grace time: forgotten
    assert c.get(12) is None and c.get(11) is not None
