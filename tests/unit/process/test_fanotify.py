"""fanotify records parsed and answers packed as the kernel lays them out."""

from __future__ import annotations

import struct

import pytest

from micropatch.process.fanotify import (
    FAN_ALLOW,
    FAN_DENY,
    FAN_OPEN_EXEC_PERM,
    FAN_OPEN_PERM,
    FAN_Q_OVERFLOW,
    METADATA,
    parse_events,
    response,
)


def record(mask: int, fd: int, pid: int, extra: bytes = b"", vers: int = 3) -> bytes:
    return struct.pack("<IBBHQii", 24 + len(extra), vers, 0, 24, mask, fd, pid) + extra


def test_layout_matches_the_kernel_headers() -> None:
    assert METADATA.size == 24  # sizeof(struct fanotify_event_metadata)
    assert len(response(3)) == 8  # sizeof(struct fanotify_response)
    assert response(7) == struct.pack("<iI", 7, FAN_ALLOW)
    assert response(7, allow=False) == struct.pack("<iI", 7, FAN_DENY)


def test_several_records_in_one_read() -> None:
    data = record(FAN_OPEN_EXEC_PERM, 5, 100) + record(FAN_OPEN_PERM, 6, 101, b"\0" * 16)
    first, second = parse_events(data)
    assert (first.mask, first.fd, first.pid, first.permission) == (FAN_OPEN_EXEC_PERM, 5, 100, True)
    assert (second.fd, second.pid, second.permission) == (6, 101, True)


def test_overflow_record_has_no_file() -> None:
    (event,) = parse_events(record(FAN_Q_OVERFLOW, -1, 0))
    assert event.overflow and not event.permission and event.fd == -1


@pytest.mark.parametrize(
    "data, message",
    [
        (record(FAN_OPEN_PERM, 5, 1, vers=2), "version 2"),
        (record(FAN_OPEN_PERM, 5, 1)[:-4] + struct.pack("<i", 1) + b"xx", "stray bytes"),
        (struct.pack("<IBBHQii", 40, 3, 0, 24, FAN_OPEN_PERM, 5, 1), "truncated"),
        (struct.pack("<IBBHQii", 8, 3, 0, 24, FAN_OPEN_PERM, 5, 1), "shorter than its header"),
    ],
)
def test_malformed_records_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_events(data)


def test_empty_read_is_no_event() -> None:
    assert parse_events(b"") == []
