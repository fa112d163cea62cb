"""process.priority.realtime: raised where permitted, always restored."""

from __future__ import annotations

import os
import threading

import pytest

from micropatch.process.priority import STOP_PRIORITY, realtime


def policy() -> tuple[int, int]:
    return os.sched_getscheduler(0) & ~os.SCHED_RESET_ON_FORK, os.sched_getparam(0).sched_priority


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="SCHED_FIFO needs root here")


@needs_root
def test_fifo_inside_and_restored_after() -> None:
    before = policy()
    with realtime() as raised:
        assert raised
        assert policy() == (os.SCHED_FIFO, STOP_PRIORITY)
    assert policy() == before


@needs_root
def test_restored_after_an_exception() -> None:
    before = policy()
    with pytest.raises(RuntimeError), realtime():
        raise RuntimeError("boom")
    assert policy() == before


@needs_root
def test_only_the_calling_thread() -> None:
    seen: list[tuple[int, int]] = []
    with realtime():
        worker = threading.Thread(target=lambda: seen.append(policy()))
        worker.start()
        worker.join()
    assert seen == [(os.SCHED_OTHER, 0)]


@needs_root
def test_nice_value_survives() -> None:
    def run() -> None:
        os.setpriority(os.PRIO_PROCESS, 0, 5)  # 0 = this thread, on Linux
        with realtime():
            pass
        seen.append(os.getpriority(os.PRIO_PROCESS, 0))

    seen: list[int] = []
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert seen == [5]


@needs_root
def test_a_higher_realtime_priority_is_left_alone() -> None:
    def run() -> None:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(STOP_PRIORITY + 5))
        with realtime() as raised:
            seen.append((raised, policy()))
        seen.append((True, policy()))

    seen: list[tuple[bool, tuple[int, int]]] = []
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert seen == [(True, (os.SCHED_FIFO, STOP_PRIORITY + 5))] * 2


def test_not_permitted_runs_at_normal_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    before = policy()
    with realtime() as raised:
        assert not raised
        assert policy() == before
    assert policy() == before
