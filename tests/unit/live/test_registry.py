"""The registry: two checksummed slots in the cave, patch states, retired trampolines."""

from __future__ import annotations

import json
import zlib
from types import SimpleNamespace

import pytest

from micropatch.errors import CaveError
from micropatch.live.cave import Cave, allocate
from micropatch.live.commit import store
from micropatch.live.registry import (
    APPLIED,
    APPLYING,
    HEADER,
    MAGIC,
    REGISTRY_SIZE,
    REMOVING,
    SLOT_SIZE,
    AppliedPatch,
    AppliedSite,
    Registry,
    Retired,
)

CAVE = 0x7F00_0000_0000


def site(trampoline: int = 0x5555_1000_4000, size: int = 40, counter: int = 0) -> AppliedSite:
    return AppliedSite(
        0, 0x5555_0000_1234, b"\x55\x48\x89\xe5\x90", b"\xe9\x00\x00\x00\x00", trampoline, size,
        trampoline + 30, counter, [trampoline + 30, trampoline + 31], [trampoline, trampoline + 30],
        [0x5555_0000_1234, 0x5555_0000_1235], "1a2b3c4d",
    )  # fmt: skip


def sample(seq: int = 0) -> Registry:
    return Registry(
        "/usr/lib/libfoo.so",
        0x5555_0000_0000,
        "ab12",
        "cd" * 32,
        65536,
        [AppliedPatch("fix-1", 2, "a fix", 1700000000.5, [site()])],
        seq=seq,
    )


class Slots:
    """A cave's registry pages in memory; `read` is what Registry.read is given."""

    def __init__(self) -> None:
        self.data = bytearray(REGISTRY_SIZE)
        self.reads: list[tuple[int, int]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return bytes(self.data[offset : offset + size])

    def write(self, address: int, data: bytes) -> None:  # as Transaction.write, at CAVE
        self.data[address - CAVE : address - CAVE + len(data)] = data

    def put(self, registry: Registry, torn: int | None = None) -> None:
        """Write `registry` to its slot; `torn`: only that many bytes of it landed."""
        blob = registry.encode()[:torn]
        self.data[registry.slot : registry.slot + len(blob)] = blob

    def current(self) -> Registry | None:
        return Registry.read(self.read)


def test_round_trip_of_one_slot() -> None:
    reg = sample(seq=7)
    assert Registry.decode(reg.encode()) == reg


def test_states_and_retired_trampolines_round_trip() -> None:
    reg = sample(seq=3)
    reg.patches[0].state = REMOVING
    reg.patches.append(AppliedPatch("fix-2", 1, "", 1.0, [site(0x5555_1000_5000)], APPLYING))
    reg.retired = [Retired(0x5555_1000_6000, 48, 0x5555_1000_F008), Retired(0x5555_1000_7000, 16)]
    back = Registry.decode(reg.encode())
    assert back == reg
    assert back is not None and [p.state for p in back.patches] == [REMOVING, APPLYING]


def test_a_registry_without_states_or_retired_reads_as_applied() -> None:
    doc = json.loads(sample().encode()[HEADER.size :])
    del doc["patches"][0]["state"], doc["retired"]
    body = json.dumps(doc).encode()
    back = Registry.decode(HEADER.pack(MAGIC, 4, len(body), zlib.crc32(body)) + body)
    assert back is not None and back.patches[0].state == APPLIED and back.retired == []
    assert back.seq == 4


def test_not_a_registry() -> None:
    assert Registry.decode(b"\x00" * 64) is None
    assert Registry.decode(b"") is None
    assert Slots().current() is None  # a cave whose creator never wrote a slot


def test_the_slot_alternates_with_the_sequence() -> None:
    assert [sample(seq).slot for seq in range(4)] == [0, SLOT_SIZE, 0, SLOT_SIZE]


def test_the_valid_slot_with_the_highest_sequence_wins() -> None:
    slots = Slots()
    older, newer = sample(seq=1), sample(seq=2)
    newer.patches[0].state = REMOVING
    slots.put(older)
    slots.put(newer)
    assert slots.current() == newer
    slots.put(sample(seq=3))  # overwrites `older`'s slot
    assert slots.current() == sample(seq=3)


def test_a_torn_slot_falls_back_to_the_other() -> None:
    slots = Slots()
    older, newer = sample(seq=1), sample(seq=2)
    newer.patches.clear()
    slots.put(older)
    for landed in (8, HEADER.size, HEADER.size + 10, len(newer.encode()) - 1):
        slots.put(newer, torn=landed)
        assert slots.current() == older, landed


def test_a_checksum_mismatch_falls_back_to_the_other_slot() -> None:
    slots = Slots()
    slots.put(sample(seq=1))
    slots.put(sample(seq=2))
    body = HEADER.size + 10
    slots.data[body] ^= 0x01  # one bit of slot 0's JSON
    assert slots.current() == sample(seq=1)
    slots.data[SLOT_SIZE + body] ^= 0x01  # and of slot 1's: nothing valid is left
    with pytest.raises(CaveError, match=r"slot at \+0x0: checksum mismatch \(a torn write\)"):
        slots.current()


def test_a_corrupt_header_is_reported_unless_the_other_slot_is_valid() -> None:
    slots = Slots()
    slots.data[: HEADER.size] = HEADER.pack(MAGIC, 2, SLOT_SIZE, 0)  # a length no slot holds
    slots.data[SLOT_SIZE : SLOT_SIZE + 4] = b"junk"
    with pytest.raises(CaveError, match=r"slot at \+0x0: length 8192; slot at \+0x2000: not a"):
        slots.current()
    slots.put(sample(seq=1))  # slot 1
    assert slots.current() == sample(seq=1)


def test_corrupt_json_with_a_valid_checksum() -> None:
    body = b'{"module_path": 1'
    with pytest.raises(CaveError, match="corrupt micropatch registry"):
        Registry.decode(HEADER.pack(MAGIC, 1, len(body), zlib.crc32(body)) + body)


def test_read_reads_the_headers_and_only_the_json_s_length() -> None:
    slots = Slots()
    reg = sample(seq=1)
    slots.put(reg)
    slots.current()
    length = len(reg.encode()) - HEADER.size
    header = HEADER.size
    assert slots.reads == [(0, header), (SLOT_SIZE, header), (SLOT_SIZE + header, length)]


def test_store_writes_the_slot_not_holding_the_current_state() -> None:
    """commit.store bumps the sequence: a store torn anywhere leaves the last one in force."""
    slots = Slots()
    cave = Cave(CAVE, 65536, sample(seq=0))
    tx = SimpleNamespace(write=slots.write)
    store(tx, cave)  # type: ignore[arg-type]
    assert cave.registry.seq == 1 and slots.current() == cave.registry
    first = Registry.decode(cave.registry.encode())
    cave.registry.patches[0].state = REMOVING
    store(tx, cave)  # type: ignore[arg-type]
    assert cave.registry.seq == 2 and slots.current() == cave.registry
    slots.data[HEADER.size] ^= 0xFF  # the second store, torn: slot 0
    assert slots.current() == first


def test_retire_keeps_the_trampolines_and_counters_out_of_reuse() -> None:
    reg = sample()
    patch = reg.patches[0]
    patch.sites.append(site(0x5555_1000_5000, 24, counter=0x5555_1000_F010))
    reg.patches.append(AppliedPatch("fix-2", 1, "", 1.0, [site(0x5555_1000_6000, 8)]))
    before = (reg.used_ranges(), reg.used_counters())
    reg.retire(patch)
    assert [p.id for p in reg.patches] == ["fix-2"]
    assert reg.retired == [
        Retired(0x5555_1000_4000, 40, 0),
        Retired(0x5555_1000_5000, 24, 0x5555_1000_F010),
    ]
    assert (reg.used_ranges(), reg.used_counters()) == before
    reg.retired.clear()  # reclaimed: only fix-2's remain
    assert reg.used_ranges() == [(0x5555_1000_6000, 0x5555_1000_6008)]
    assert reg.used_counters() == []


def test_too_many_patches() -> None:
    reg = sample()
    reg.patches *= 200
    with pytest.raises(CaveError, match=rf"the registry needs \d+ bytes, a slot holds {SLOT_SIZE}"):
        reg.encode()


def test_allocate_first_fit() -> None:
    base = 0x10000
    first = base + REGISTRY_SIZE
    assert allocate([], base, 65536, 100) == first
    assert allocate([(first, first + 100)], base, 65536, 50) == first + 112  # 16-aligned
    assert allocate([(first + 64, first + 100)], base, 65536, 64) == first  # a hole first
    with pytest.raises(CaveError, match="full"):
        allocate([], base, REGISTRY_SIZE + 32, 64)
