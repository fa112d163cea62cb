"""The registry: two checksummed slots in the cave's first page (an overflow area
each for long documents) beside the blocked-event counters, patch states, retired
trampolines; caves of the earlier layouts (versions 2 and 3)."""

from __future__ import annotations

import json
import random
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
    LAYOUT,
    LAYOUT_V2,
    LAYOUT_V3,
    MAGIC,
    PAGE,
    REGISTRY_SIZE,
    REMOVING,
    AppliedPatch,
    AppliedSite,
    Registry,
    Retired,
)

CAVE = 0x7F00_0000_0000
SLOT = LAYOUT.slot_size


def site(trampoline: int = 0x5555_1000_4000, size: int = 40, counter: int = 0) -> AppliedSite:
    return AppliedSite(
        0, 0x5555_0000_1234, b"\x55\x48\x89\xe5\x90", b"\xe9\x00\x00\x00\x00", trampoline, size,
        trampoline + 30, counter, [trampoline + 30, trampoline + 31], [trampoline, trampoline + 30],
        [0x5555_0000_1234, 0x5555_0000_1235], "1a2b3c4d",
    )  # fmt: skip


def sample(seq: int = 0, sites: int = 1, title: str = "a fix") -> Registry:
    return Registry(
        "/usr/lib/libfoo.so",
        0x5555_0000_0000,
        "ab12",
        "cd" * 32,
        65536,
        [AppliedPatch("fix-1", 2, title, 1700000000.5, [site() for _ in range(sites)])],
        seq=seq,
    )


def long(seq: int, size: int = 2 * SLOT) -> Registry:
    """A registry whose stored (compressed) document is longer than `size` bytes:
    a title that does not compress."""
    title = random.Random(seq).randbytes(size).hex()
    registry = sample(seq, title=title)
    assert len(registry.body()) > size
    return registry


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
        """Write `registry`'s images in order; `torn`: only that many bytes landed in all."""
        left = len(self.data) if torn is None else torn
        for offset, blob in registry.images():
            blob = blob[:left]
            self.data[offset : offset + len(blob)] = blob
            left -= len(blob)

    def current(self) -> Registry | None:
        return Registry.read(self.read)

    def pages(self) -> set[int]:
        """The pages any read touched."""
        return {
            page
            for at, size in self.reads
            for page in range(at // PAGE, (at + size - 1) // PAGE + 1)
        }


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
    """As the first versions wrote them (layout 2)."""
    doc = json.loads(zlib.decompress(sample().encode()[HEADER.size :]))
    del doc["patches"][0]["state"], doc["retired"]
    body = json.dumps(doc).encode()
    back = Registry.decode(HEADER.pack(LAYOUT_V2.magic, 4, len(body), zlib.crc32(body)) + body)
    assert back is not None and back.patches[0].state == APPLIED and back.retired == []
    assert back.seq == 4


def test_not_a_registry() -> None:
    assert Registry.decode(b"\x00" * 64) is None
    assert Registry.decode(b"") is None
    assert Slots().current() is None  # a cave whose creator never wrote a slot


def test_both_slots_share_the_first_page_and_alternate_with_the_sequence() -> None:
    assert [sample(seq).slot for seq in range(4)] == [0, SLOT, 0, SLOT]
    assert LAYOUT.counters == (2 * SLOT, PAGE) and LAYOUT.code_start == REGISTRY_SIZE


def test_what_the_target_writes_is_outside_every_slot_and_checksum() -> None:
    """Patchlets increment their counters, in the registry's page, while the process
    runs: no slot, header or overflow area covers them, so neither the registry nor
    a store is disturbed by them, and a store never touches them."""
    start, end = LAYOUT.counters  # type: ignore[misc]
    assert all(at + SLOT <= start for at in LAYOUT.slots)
    assert LAYOUT.overflow is not None and min(LAYOUT.overflow) >= PAGE
    slots = Slots()
    slots.put(sample(seq=1))
    slots.data[start:end] = b"\xff" * (end - start)  # every counter counted
    assert slots.current() == sample(seq=1)
    for registry in (sample(seq=2), long(seq=3)):
        for offset, blob in registry.images():
            assert offset + len(blob) <= start or offset >= PAGE, (offset, len(blob))
        slots.put(registry)
        assert slots.current() == registry
    assert slots.data[start:end] == b"\xff" * (end - start)


def test_an_update_of_a_few_sites_fits_its_slot() -> None:
    """The first page alone, with the counters, holds a registry of a few patches:
    here an update's intent, both versions of a 4-site patch recorded at once,
    with sites that do not repeat each other (the JSON is stored compressed)."""
    registry = sample()
    registry.patches = [
        AppliedPatch(
            "fix-1", version, "a fix", 1700000000.5,
            [site(0x5555_1000_4000 + 0x1357 * (4 * version + i)) for i in range(4)],
        )
        for version in (1, 2)
    ]  # fmt: skip
    assert len(registry.body()) <= SLOT - HEADER.size
    assert len(json.loads(zlib.decompress(registry.body()))["patches"]) == 2


def test_a_small_registry_is_read_from_the_first_page_alone() -> None:
    """The pages a reader touches become resident in the target (and the memfd's):
    a cave with a few patches keeps only page 0 and its first trampoline page."""
    slots = Slots()
    slots.put(sample(seq=1))
    slots.put(sample(seq=2))
    assert slots.current() == sample(seq=2)
    assert slots.pages() == {0}


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


def test_a_long_registry_overflows_into_its_slot_s_own_area() -> None:
    """The JSON goes first, the slot's header (with its checksum) last: torn anywhere,
    the other slot stays in force; the other slot's overflow area is never touched."""
    long_one = long(seq=2)
    [(overflow, body), (slot, header)] = long_one.images()
    assert (overflow, slot, len(header)) == (LAYOUT.overflow[0], 0, HEADER.size)  # type: ignore[index]
    assert len(body) > SLOT - HEADER.size
    slots = Slots()
    slots.put(sample(seq=1))
    slots.data[LAYOUT.overflow[1] : LAYOUT.overflow[1] + 8] = b"untouchd"  # type: ignore[index]
    for landed in (10, len(body), len(body) + HEADER.size - 1):
        slots.put(long_one, torn=landed)
        assert slots.current() == sample(seq=1), landed
    slots.put(long_one)
    slots.reads.clear()
    assert slots.current() == long_one
    overflow = LAYOUT.overflow[0]  # type: ignore[index]
    assert slots.pages() == {0, *range(overflow // PAGE, (overflow + len(body) - 1) // PAGE + 1)}
    assert slots.data[LAYOUT.overflow[1] : LAYOUT.overflow[1] + 8] == b"untouchd"  # type: ignore[index]


def test_a_slot_whose_old_overflow_is_overwritten_is_invalid() -> None:
    """Slot 0 held a long state (seq 2) when seq 4, also long, is written into its
    overflow area and the patcher dies before slot 0's header: slot 0's header no
    longer matches its JSON, and slot 1 (seq 3) is in force."""
    slots = Slots()
    slots.put(long(seq=2))
    slots.put(sample(seq=3))
    other = long(seq=4, size=3 * SLOT)
    slots.put(other, torn=len(other.images()[0][1]))
    assert slots.current() == sample(seq=3)


def test_a_checksum_mismatch_falls_back_to_the_other_slot() -> None:
    slots = Slots()
    slots.put(sample(seq=1))
    slots.put(sample(seq=2))
    body = HEADER.size + 10
    slots.data[body] ^= 0x01  # one bit of slot 0's JSON
    assert slots.current() == sample(seq=1)
    slots.data[SLOT + body] ^= 0x01  # and of slot 1's: nothing valid is left
    with pytest.raises(CaveError, match=r"slot at \+0x0: checksum mismatch \(a torn write\)"):
        slots.current()


def test_a_corrupt_header_is_reported_unless_the_other_slot_is_valid() -> None:
    slots = Slots()
    slots.data[: HEADER.size] = HEADER.pack(MAGIC, 2, 3 * PAGE, 0)  # a length no slot holds
    slots.data[SLOT : SLOT + 4] = b"junk"
    with pytest.raises(
        CaveError, match=rf"slot at \+0x0: length 12288; slot at \+{SLOT:#x}: not a"
    ):
        slots.current()
    slots.put(sample(seq=1))  # slot 1
    assert slots.current() == sample(seq=1)


def test_junk_where_a_registry_should_be_is_corrupt() -> None:
    slots = Slots()
    slots.data[SLOT : SLOT + 4] = b"junk"
    with pytest.raises(CaveError, match="no slot holds a micropatch registry"):
        slots.current()


def test_a_cave_of_a_newer_layout_is_named_so_not_corrupt() -> None:
    slots = Slots()
    newer = MAGIC[:-1] + bytes([MAGIC[-1] + 1])
    slots.data[0 : HEADER.size] = HEADER.pack(newer, 1, 0, 0)
    with pytest.raises(CaveError, match=rf"layout {MAGIC[-1] + 1}, written by a newer micropatch"):
        slots.current()


@pytest.mark.parametrize(
    "body", [zlib.compress(b'{"module_path": 1'), b'{"module_path": 1'], ids=["json", "zlib"]
)
def test_corrupt_json_with_a_valid_checksum(body: bytes) -> None:
    with pytest.raises(CaveError, match="corrupt micropatch registry"):
        Registry.decode(HEADER.pack(MAGIC, 1, len(body), zlib.crc32(body)) + body)


def test_a_version_2_cave_is_read_and_written_in_its_own_layout() -> None:
    """Caves made before the registry shared one page: 8 KiB slots at 0 and 8 KiB,
    the first state (seq 1) in the second one, trampolines from 16 KiB."""
    slots = Slots()
    v2 = sample(seq=1)
    v2.layout = LAYOUT_V2
    assert v2.images() == [(2 * PAGE, v2.encode())]
    slots.put(v2)
    back = slots.current()
    assert back == v2 and back is not None and back.layout is LAYOUT_V2
    back.seq += 1
    back.patches[0].state = REMOVING
    assert [at for at, _ in back.images()] == [0]
    slots.put(back)
    assert slots.current() == back
    assert LAYOUT_V2.code_start == 4 * PAGE


def test_a_version_3_cave_is_read_and_written_in_its_own_layout() -> None:
    """Caves made by the previous version, found in a process patched before an
    upgrade: 2 KiB slots filling the first page, counters in the cave's last page."""
    slots = Slots()
    v3 = sample(seq=1)
    v3.layout = LAYOUT_V3
    assert v3.images() == [(PAGE // 2, v3.encode())]
    slots.put(v3)
    back = slots.current()
    assert back == v3 and back is not None and back.layout is LAYOUT_V3
    back.seq += 1
    back.patches[0].state = REMOVING
    assert [at for at, _ in back.images()] == [0]
    slots.put(back)
    assert slots.current() == back
    assert LAYOUT_V3.counter_area(65536) == (65536 - PAGE, 65536)


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


def test_heads_change_with_every_state() -> None:
    slots = Slots()
    slots.put(sample(seq=1))
    before = Registry.heads(LAYOUT, slots.read)
    assert len(before) == 2 * HEADER.size
    slots.put(sample(seq=2))
    assert Registry.heads(LAYOUT, slots.read) != before


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
    reg = sample(title=random.Random(0).randbytes(LAYOUT.capacity).hex())
    capacity = LAYOUT.capacity
    with pytest.raises(CaveError, match=rf"the registry needs \d+ bytes, a slot holds {capacity}"):
        reg.images()


def test_allocate_first_fit() -> None:
    base = 0x10000
    first = base + REGISTRY_SIZE
    assert allocate([], base, 65536, 100) == first
    assert allocate([(first, first + 100)], base, 65536, 50) == first + 112  # 16-aligned
    assert allocate([(first + 64, first + 100)], base, 65536, 64) == first  # a hole first
    assert allocate([], base, 65536, 64, start=LAYOUT_V2.code_start) == base + 4 * PAGE
    with pytest.raises(CaveError, match="full"):
        allocate([], base, REGISTRY_SIZE + 32, 64)
