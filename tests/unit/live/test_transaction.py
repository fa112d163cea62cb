"""The transaction journal, and the commit steps that use it, on an in-memory fake
of the target: its memory, its threads' registers."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from micropatch.arch import TrampolineLayout
from micropatch.arch.x86_64.abi import UserRegs
from micropatch.errors import MemoryAccessError
from micropatch.live import commit
from micropatch.live.cave import CAVE_SIZE, Cave
from micropatch.live.registry import REGISTRY_SIZE, AppliedPatch, AppliedSite, Registry, Retired
from micropatch.live.safety import PendingMove
from micropatch.live.transaction import Transaction
from micropatch.process.maps import Mapping

BASE = 0x1000


class FakeMemory:
    """Bytes at BASE..; addresses in `lost` ignore writes (a write the kernel
    acknowledged but that did not land); every write is logged."""

    def __init__(self, data: bytes, lost: range = range(0)) -> None:
        self.data = bytearray(data)
        self.lost = lost
        self.log: list[tuple[int, bytes | int]] = []  # writes; set_regs as (tid, rip)

    def read(self, address: int, size: int) -> bytes:
        return bytes(self.data[address - BASE : address - BASE + size])

    def write(self, address: int, data: bytes) -> None:
        self.log.append((address, data))
        for i, byte in enumerate(data):
            if address + i not in self.lost:
                self.data[address - BASE + i] = byte


@dataclass
class FakeThread:
    regs: UserRegs
    pending_signal: int = 0  # what RemoteSyscalls looks at to choose its thread


class FakeProc:
    """The parts of StoppedProcess that a Transaction and the commit steps use; every
    set_regs is logged in `log` next to the memory writes."""

    def __init__(self, memory: FakeMemory, threads: dict[int, int] | None = None) -> None:
        self.pid = 42
        self.writes = 0
        self.lone = False
        self.memory = memory
        self.threads = {tid: FakeThread(regs(rip)) for tid, rip in (threads or {42: 0}).items()}

    def regs(self, tid: int) -> UserRegs:
        return self.threads[tid].regs

    def set_regs(self, tid: int, new: UserRegs) -> None:
        self.memory.log.append((tid, new.rip))
        self.threads[tid].regs = new.copy()


def regs(rip: int, rsp: int = 0) -> UserRegs:
    r = UserRegs()
    r.rip, r.rsp, r.orig_rax = rip, rsp, (1 << 64) - 1
    return r


def transaction(memory: FakeMemory, threads: dict[int, int] | None = None) -> Transaction:
    return Transaction(FakeProc(memory, threads), [])  # type: ignore[arg-type]


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
        MemoryAccessError, match=r"process 42: read-back at 0x1003 found 03 bb, wrote bb bb"
    ):
        tx.verify()
    tx.rollback()
    assert bytes(memory.data) == ORIGINAL


def test_the_remote_syscalls_borrow_the_main_thread_unless_it_holds_a_signal() -> None:
    memory = FakeMemory(ORIGINAL)
    assert transaction(memory, {41: 0, 42: 0, 43: 0}).syscalls.tid == 42
    proc = FakeProc(memory, {41: 0, 42: 0, 43: 0})
    proc.threads[42].pending_signal = 10  # SIGUSR1, intercepted in the stop
    proc.threads[41].pending_signal = 10
    assert Transaction(proc, []).syscalls.tid == 43  # type: ignore[arg-type]


def test_close_without_a_remote_call_writes_nothing() -> None:
    memory = FakeMemory(ORIGINAL)
    tx = transaction(memory)
    tx.write(BASE, b"\x01")
    tx.close()
    assert memory.log == [(BASE, b"\x01")]


SITE = BASE + 4
COPY = BASE + 0x40  # where the displaced instructions' copies start
COPIES = TrampolineLayout(BASE + 0x20, b"", (BASE + 0x20, COPY), (COPY, COPY + 2, COPY + 6), False)


def test_a_thread_moves_at_once_and_back_after_the_later_writes_are_undone() -> None:
    """Thread moves take effect when decided, between the registry and the jumps; a
    rollback undoes the jump, then moves the thread back, then undoes the trampoline."""
    memory = FakeMemory(bytes(0x100))
    tx = transaction(memory, {42: 0x9999, 43: SITE + 2})
    tx.write(COPY, b"\x90" * 6)  # the trampoline
    commit.move_threads(tx, [PendingMove(43, 0, 1)], [COPIES])
    assert memory.log[-1] == (43, COPY + 2) and tx.proc.regs(43).rip == COPY + 2
    tx.write(SITE, b"\xe9" + bytes(4))  # the jump
    assert tx.rollback() == []
    assert memory.log[3:] == [(SITE, bytes(5)), (43, SITE + 2), (COPY, bytes(6))]
    assert tx.proc.regs(43).rip == SITE + 2 and tx.proc.regs(42).rip == 0x9999


CAVE = 0x10_0000
STACK = Mapping(0x20_0000, 0x20_1000, "rw-p", 0, "00:00", 0, "[stack]")


class Regions(FakeMemory):
    """The cave's registry pages and a stack, zeroed."""

    def __init__(self, stack: bytes = b"") -> None:
        super().__init__(b"")
        self.regions = {CAVE: bytearray(REGISTRY_SIZE), STACK.start: bytearray(STACK.size)}
        self.regions[STACK.start][: len(stack)] = stack

    def _at(self, address: int) -> tuple[bytearray, int]:
        for start, data in self.regions.items():
            if start <= address < start + len(data):
                return data, address - start
        raise AssertionError(f"no fake memory at {address:#x}")

    def read(self, address: int, size: int) -> bytes:
        data, offset = self._at(address)
        return bytes(data[offset : offset + size])

    def write(self, address: int, data: bytes) -> None:
        self.log.append((address, data))
        region, offset = self._at(address)
        region[offset : offset + len(data)] = data


A = (CAVE + REGISTRY_SIZE, 0x40)
B = (CAVE + REGISTRY_SIZE + 0x40, 0x40)


def cave_with(patches: int, retired: list[tuple[int, int]]) -> Cave:
    registry = Registry("/m", 0x5555_0000_0000, None, "", CAVE_SIZE, seq=5)
    for n in range(patches):
        at = CAVE + REGISTRY_SIZE + 0x100
        site = AppliedSite(0, 0x5555_0000_1000, bytes(5), b"\xe9" + bytes(4), at, 0x20)
        registry.patches.append(AppliedPatch(f"p{n}", 1, "", 0.0, [site]))
    registry.retired = [Retired(address, size) for address, size in retired]
    return Cave(CAVE, CAVE_SIZE, registry)


def reclaim(tx: Transaction, caves: list[Cave], mp: pytest.MonkeyPatch) -> list[str]:
    """Run commit.finish, scanning every cave (as repair does); its verify and
    unmap steps, in order."""
    steps = watch(tx, mp)
    commit.finish(tx, caves, everything=True)
    return steps


def watch(tx: Transaction, mp: pytest.MonkeyPatch) -> list[str]:
    """Log the transaction's verify and commit's unmaps (faked) in a list, in order."""
    steps: list[str] = []
    real_verify = tx.verify

    def verify() -> None:
        steps.append("verify")
        real_verify()

    mp.setattr(tx, "verify", verify)
    mp.setattr(
        commit, "unmap_cave", lambda syscalls, cave: steps.append(f"unmap {cave.address:#x}")
    )
    return steps


def stored(memory: Regions) -> Registry | None:
    return Registry.read(lambda offset, size: memory.read(CAVE + offset, size))


def test_reclaim_keeps_a_retired_trampoline_a_thread_is_in(monkeypatch) -> None:
    memory = Regions()
    tx = Transaction(FakeProc(memory, {42: 0x1234, 43: B[0] + 8}), [STACK])  # type: ignore[arg-type]
    cave = cave_with(0, [A, B])
    assert reclaim(tx, [cave], monkeypatch) == ["verify"]  # not emptied: not unmapped
    assert cave.registry.retired == [Retired(*B)]
    assert stored(memory) == cave.registry and cave.registry.seq == 6


def test_reclaim_keeps_a_retired_trampoline_a_return_address_points_into(monkeypatch) -> None:
    rsp = STACK.start + 0x80
    memory = Regions(bytes(0x88) + (A[0] + 0x10).to_bytes(8, "little"))
    tx = Transaction(FakeProc(memory, {42: 0x1234}), [STACK])  # type: ignore[arg-type]
    tx.proc.regs(42).rsp = rsp
    cave = cave_with(1, [A, B])
    assert reclaim(tx, [cave], monkeypatch) == ["verify"]
    assert cave.registry.retired == [Retired(*A)] and stored(memory) == cave.registry


def test_reclaim_writes_nothing_when_every_retired_trampoline_is_in_use(monkeypatch) -> None:
    memory = Regions()
    tx = Transaction(FakeProc(memory, {42: A[0], 43: B[0]}), [STACK])  # type: ignore[arg-type]
    cave = cave_with(0, [A, B])
    assert reclaim(tx, [cave], monkeypatch) == ["verify"]
    assert memory.log == [] and len(cave.registry.retired) == 2


def test_reclaim_frees_unused_trampolines_and_keeps_the_patches(monkeypatch) -> None:
    memory = Regions()
    tx = Transaction(FakeProc(memory, {42: 0x1234}), [STACK])  # type: ignore[arg-type]
    cave = cave_with(1, [A, B])
    assert reclaim(tx, [cave], monkeypatch) == ["verify"]
    assert cave.registry.retired == [] and [p.id for p in cave.registry.patches] == ["p0"]
    assert stored(memory) == cave.registry


def test_reclaim_unmaps_an_emptied_cave_last_after_verifying(monkeypatch) -> None:
    """The unmap cannot be undone: it comes after the read-back, and no registry is
    written into a cave about to go."""
    memory = Regions()
    tx = Transaction(FakeProc(memory, {42: 0x1234}), [STACK])  # type: ignore[arg-type]
    tx.write(CAVE, b"\x01")  # an earlier write of the transaction
    emptied, kept = cave_with(0, [A]), cave_with(1, [])
    kept.address = CAVE + REGISTRY_SIZE  # never read or written: nothing to reclaim there
    assert reclaim(tx, [emptied, kept], monkeypatch) == ["verify", f"unmap {CAVE:#x}"]
    assert memory.log == [(CAVE, b"\x01")]


def test_reclaim_does_not_unmap_when_the_read_back_fails(monkeypatch) -> None:
    memory = Regions()
    tx = Transaction(FakeProc(memory, {42: 0x1234}), [STACK])  # type: ignore[arg-type]
    tx.write(CAVE, b"\x01")
    memory.regions[CAVE][0] = 0  # the write did not land
    steps = watch(tx, monkeypatch)
    with pytest.raises(MemoryAccessError, match="read-back at 0x100000 found 00, wrote 01"):
        commit.finish(tx, [cave_with(0, [A])], everything=True)
    assert steps == ["verify"]


def test_reclaim_with_no_retired_trampoline_only_verifies(monkeypatch) -> None:
    memory = Regions()
    tx = Transaction(FakeProc(memory, {42: A[0]}), [STACK])  # type: ignore[arg-type]
    cave = cave_with(2, [])
    assert reclaim(tx, [cave], monkeypatch) == ["verify"] and memory.log == []


def test_reclaim_leaves_retired_trampolines_of_a_cave_in_use_for_later(monkeypatch) -> None:
    """Freeing means scanning every stack: not done while the cave still has patches
    and its retired trampolines are few; the registry is not rewritten."""
    memory = Regions()
    tx = Transaction(FakeProc(memory, {42: 0x1234}), [STACK])  # type: ignore[arg-type]
    cave = cave_with(1, [A, B])
    steps = watch(tx, monkeypatch)
    commit.finish(tx, [cave])
    assert steps == ["verify"]
    assert cave.registry.retired != [] and stored(memory) is None
