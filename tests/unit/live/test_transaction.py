"""The transaction journal on an in-memory fake of the target's memory."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from micropatch.errors import MemoryAccessError
from micropatch.live.transaction import Transaction

BASE = 0x1000


class FakeMemory:
    """Bytes at BASE..; addresses in `lost` ignore writes (a write the kernel
    acknowledged but that did not land); every write is logged."""

    def __init__(self, data: bytes, lost: range = range(0)) -> None:
        self.data = bytearray(data)
        self.lost = lost
        self.log: list[tuple[int, bytes]] = []

    def read(self, address: int, size: int) -> bytes:
        return bytes(self.data[address - BASE : address - BASE + size])

    def write(self, address: int, data: bytes) -> None:
        self.log.append((address, data))
        for i, byte in enumerate(data):
            if address + i not in self.lost:
                self.data[address - BASE + i] = byte


def transaction(memory: FakeMemory) -> Transaction:
    proc = SimpleNamespace(pid=42, threads={42: None}, memory=memory)
    return Transaction(proc, [])  # type: ignore[arg-type]


ORIGINAL = bytes(range(16))


def test_rollback_undoes_overlapping_writes_newest_first() -> None:
    memory = FakeMemory(ORIGINAL)
    tx = transaction(memory)
    tx.write(BASE + 2, b"\xaa" * 6)
    tx.write(BASE + 4, b"\xbb" * 6)  # covers the end of the first write
    assert memory.data == ORIGINAL[:2] + b"\xaa" * 2 + b"\xbb" * 6 + ORIGINAL[10:]
    assert tx.rollback() == []
    assert bytes(memory.data) == ORIGINAL  # oldest first would leave aa aa at 4..7


def test_rollback_interleaves_callbacks_with_writes_in_reverse() -> None:
    memory = FakeMemory(ORIGINAL)
    tx = transaction(memory)
    order: list[str] = []
    tx.on_rollback(lambda: order.append("unmap cave"))
    tx.write(BASE, b"\x01")
    tx.on_rollback(lambda: order.append(f"move thread back, memory {memory.read(BASE, 1).hex()}"))
    tx.write(BASE, b"\x02")
    tx.rollback()
    # the thread moves back while the first write is still in place; the cave goes last
    assert order == ["move thread back, memory 01", "unmap cave"]
    assert memory.log[-2:] == [(BASE, b"\x01"), (BASE, ORIGINAL[:1])]


def test_rollback_keeps_going_after_a_failure_and_reports_it() -> None:
    memory = FakeMemory(ORIGINAL)
    tx = transaction(memory)
    tx.write(BASE, b"\xff\xff")

    def fails() -> None:
        raise OSError("munmap failed")

    tx.on_rollback(fails)
    tx.write(BASE + 8, b"\xee")
    [failure] = tx.rollback()
    assert str(failure) == "munmap failed"
    assert bytes(memory.data) == ORIGINAL
    assert tx.rollback() == []  # the journal is spent: nothing is undone twice
    assert len(memory.log) == 4


def test_verify_compares_each_range_with_the_final_bytes() -> None:
    memory = FakeMemory(ORIGINAL)
    tx = transaction(memory)
    tx.write(BASE, b"\xe9\x01\x02\x03\x04")  # a site jump...
    tx.write(BASE, ORIGINAL[:5])  # ...restored by an update...
    tx.write(BASE + 2, b"\xcc")  # ...and partly patched again
    tx.verify()


def test_verify_finds_a_write_that_did_not_land() -> None:
    memory = FakeMemory(ORIGINAL, lost=range(BASE + 3, BASE + 4))
    tx = transaction(memory)
    tx.write(BASE, b"\xaa" * 2)
    tx.write(BASE + 2, b"\xbb" * 3)
    with pytest.raises(
        MemoryAccessError, match=r"process 42: read-back at 0x1002 found bb 03 bb, wrote bb bb bb"
    ):
        tx.verify()
    tx.rollback()
    assert bytes(memory.data) == ORIGINAL
