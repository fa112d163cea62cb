"""Decoding proc connector messages: layouts from include/uapi/linux/cn_proc.h."""

from __future__ import annotations

import signal
import struct

import pytest

from micropatch.process import connector, procevents
from micropatch.process.procevents import (
    CN_MSG,
    EXIT_DATA,
    NLMSGHDR,
    PROC_EVENT_HEAD,
    ExecEvent,
    ExitEvent,
    ForkEvent,
    parse,
)


def test_layouts_match_the_kernel() -> None:
    assert NLMSGHDR.size == 16
    assert CN_MSG.size == 20  # cb_id(8) seq ack len flags
    assert PROC_EVENT_HEAD.size == 16  # what, cpu, timestamp_ns aligned to 8: no padding
    assert EXIT_DATA.size == 24  # the largest union member with comm (4+4+16)


def _message(what: int, union: bytes, *, idx: int = 1, kind: int = procevents.NLMSG_DONE) -> bytes:
    event = PROC_EVENT_HEAD.pack(what, 0, 12345) + union.ljust(24, b"\0")
    cn = CN_MSG.pack(idx, 1, 7, 0, len(event), 0) + event
    return NLMSGHDR.pack(NLMSGHDR.size + len(cn), kind, 0, 7, 0) + cn


def test_an_exit_event_decodes_at_offset_36() -> None:
    data = _message(procevents.PROC_EVENT_EXIT, EXIT_DATA.pack(10, 10, 0x8B, 17, 1, 1))
    assert data[36:40] == struct.pack("=I", procevents.PROC_EVENT_EXIT)
    (event,) = parse(data)
    assert event == ExitEvent(10, 10, 0x8B, 17, 1, 1, 12345)
    assert isinstance(event, ExitEvent)
    assert event.signal == signal.SIGSEGV
    assert event.core_dumped
    assert event.crashed
    assert "core dumped" in event.describe()


def test_exec_fork_and_several_messages_in_one_datagram() -> None:
    data = (
        _message(procevents.PROC_EVENT_FORK, struct.pack("=iiii", 1, 1, 5, 5))
        + _message(procevents.PROC_EVENT_EXEC, struct.pack("=ii", 5, 5))
        + _message(procevents.PROC_EVENT_COMM, b"")  # not decoded: skipped
        + _message(procevents.PROC_EVENT_EXIT, EXIT_DATA.pack(5, 5, 0, 17, 1, 1), idx=2)
        + _message(procevents.PROC_EVENT_EXIT, EXIT_DATA.pack(5, 5, 0, 17, 1, 1), kind=2)
    )
    assert parse(data) == [ForkEvent(1, 1, 5, 5, 12345), ExecEvent(5, 5, 12345)]


def test_truncated_data_is_ignored() -> None:
    data = _message(procevents.PROC_EVENT_EXIT, EXIT_DATA.pack(5, 5, 0, 17, 1, 1))
    assert parse(data[:30]) == []
    assert parse(b"") == []


@pytest.mark.parametrize(
    ("code", "sig", "status", "crashed"),
    [
        (0, None, 0, False),
        (3 << 8, None, 3, False),
        (signal.SIGSEGV, signal.SIGSEGV, None, True),
        (signal.SIGBUS | 0x80, signal.SIGBUS, None, True),
        (signal.SIGILL, signal.SIGILL, None, True),
        (signal.SIGABRT | 0x80, signal.SIGABRT, None, True),
        (signal.SIGTRAP, signal.SIGTRAP, None, True),
        (signal.SIGKILL, signal.SIGKILL, None, False),
        (signal.SIGTERM, signal.SIGTERM, None, False),
        (signal.SIGFPE, signal.SIGFPE, None, False),
    ],
)
def test_exit_code_decoding(code: int, sig: int | None, status: int | None, crashed: bool) -> None:
    # exit_signal is what the parent gets: SIGSEGV there must not make a crash.
    event = ExitEvent(pid=4, tgid=4, exit_code=code, exit_signal=signal.SIGSEGV)
    assert event.signal == sig
    assert event.status == status
    assert event.crashed is crashed
    assert not event.core_dumped or code & 0x80


def test_a_thread_is_not_a_process_exit() -> None:
    event = ExitEvent(pid=5, tgid=4, exit_code=signal.SIGSEGV, exit_signal=-1)
    assert not event.process_exit
    assert not event.crashed


def test_unknown_kinds_are_refused() -> None:
    with pytest.raises(ValueError, match="event kinds"):
        connector.ExitWatcher(("exit", "comm"))
