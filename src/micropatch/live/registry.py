"""The registry: what is applied to a process, kept in the first page of its cave.

The state of a process lives in the process, so any later command, or an
agent restarted after a crash, reads it back from memory instead of trusting
a file of ours. It is a JSON document in one of two slots, each with a header
(magic, sequence number, length, CRC-32): a writer always writes the slot the
current state is *not* in, so a patcher killed mid-write leaves the previous
slot intact, and a reader takes the valid slot with the highest sequence.

Both slots share the cave's first page with the blocked-event counters that
patchlets increment (a fixed area at the page's end, which no header or
checksum covers): that page is read+write and never executable, the code
pages read+execute and never writable (W^X), so a cave with a few patches
keeps two pages resident, nothing more. A document longer than its slot
continues in that slot's own overflow area, written before the slot's
header: the header, which holds the checksum, is the write that commits
(`Layout`). The JSON is stored zlib-compressed (957 bytes become 441 for a
two-site patch), so an update of a few sites, both versions recorded at
once, still fits its slot in the first page. Caves made by earlier
versions, found in a process patched before an upgrade, are read and
written in their own layout (version 3: two 2 KiB slots of plain JSON,
counters in the cave's last page; version 2: two 8 KiB slots at 0 and
8 KiB, counters in the last page).

Each patch has a state: `applying` (intent recorded, jumps being written),
`applied`, or `removing` (original bytes being restored). A patcher killed
between two steps leaves a state the next transaction recognises and
completes or rolls back (`live.recovery`). Trampolines of removed patches
are `retired`, not freed: a thread may still be running in one.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from micropatch.errors import CaveError

MAGIC = b"MICROPATCH\x00\x04"
MAGIC_V3 = b"MICROPATCH\x00\x03"
MAGIC_V2 = b"MICROPATCH\x00\x02"
HEADER = struct.Struct("<12sQII")  # magic, sequence, JSON length, CRC-32 of the JSON
APPLYING, APPLIED, REMOVING = "applying", "applied", "removing"


@dataclass(frozen=True)
class Layout:
    """Where a registry version keeps its two slots. Slot i holds a header and, if
    it fits, the JSON; a longer JSON goes to `overflow[i]` (None: no overflow,
    the slot holds up to `slot_size` bytes in all)."""

    magic: bytes
    slots: tuple[int, int]
    slot_size: int
    overflow: tuple[int, int] | None
    overflow_size: int
    code_start: int  # offset in the cave of the first trampoline
    # [start, end) of the blocked-event counters in the first page, which is then
    # writable with the registry; None: they are the cave's last page (v2, v3).
    counters: tuple[int, int] | None = None
    compressed: bool = False  # the JSON is stored zlib-compressed (layout 4)

    @property
    def capacity(self) -> int:
        """The longest JSON a slot can hold."""
        inline = self.slot_size - HEADER.size
        return max(inline, self.overflow_size) if self.overflow else inline

    def images(self, seq: int, body: bytes) -> list[tuple[int, bytes]]:
        """(offset, bytes) to write, in this order, to record `body` as state `seq`."""
        index = seq % 2
        header = HEADER.pack(self.magic, seq, len(body), zlib.crc32(body))
        if len(body) <= self.slot_size - HEADER.size:
            return [(self.slots[index], header + body)]
        assert self.overflow is not None and len(body) <= self.overflow_size
        return [(self.overflow[index], body), (self.slots[index], header)]

    def counter_area(self, cave_size: int) -> tuple[int, int]:
        """[start, end) offsets in the cave of its blocked-event counters."""
        return self.counters or (cave_size - PAGE, cave_size)

    def code_end(self, cave_size: int) -> int:
        """Where the trampoline area, which starts at `code_start`, ends."""
        return cave_size if self.counters else cave_size - PAGE

    def writable_area(self, cave_size: int) -> tuple[int, int]:
        """[start, end) offsets of the cave's read+write pages (all others: read+execute)."""
        return (0, self.code_start) if self.counters else (cave_size - PAGE, cave_size)

    def body_at(self, index: int, length: int) -> int:
        """Where slot `index`'s JSON of `length` bytes is."""
        if length <= self.slot_size - HEADER.size or self.overflow is None:
            return self.slots[index] + HEADER.size
        return self.overflow[index]


PAGE = 4096
COUNTERS = 1024  # 128 blocked-event counters of 8 bytes, at the end of the first page
SLOT = (PAGE - COUNTERS) // 2
LAYOUT = Layout(
    MAGIC, (0, SLOT), SLOT, (PAGE, 3 * PAGE), 2 * PAGE, 5 * PAGE, (PAGE - COUNTERS, PAGE), True
)
LAYOUT_V3 = Layout(MAGIC_V3, (0, PAGE // 2), PAGE // 2, (PAGE, 3 * PAGE), 2 * PAGE, 5 * PAGE)
LAYOUT_V2 = Layout(MAGIC_V2, (0, 2 * PAGE), 2 * PAGE, None, 0, 4 * PAGE)
REGISTRY_SIZE = LAYOUT.code_start


@dataclass
class AppliedSite:
    patchlet: int
    address: int
    original: bytes
    jump: bytes  # what we wrote over the site
    trampoline: int
    trampoline_size: int
    tail: int = 0  # where the relocated copy of the displaced instructions starts; 0: none
    counter: int = 0  # address of the patchlet's blocked-event counter; 0: none
    # The trampoline's layout: where each displaced instruction's copy starts, then
    # the jump back (empty: resumes elsewhere); the body's [start, end).
    copies: list[int] = field(default_factory=list)
    body: list[int] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # each displaced instruction's address
    code_hash: str = ""  # CRC-32 of the trampoline's code as written, to check it in recovery


@dataclass
class AppliedPatch:
    id: str
    version: int
    title: str
    applied_at: float  # Unix time
    sites: list[AppliedSite]
    state: str = APPLIED


@dataclass
class Retired:
    """A removed patch's trampoline, kept until no thread can be in it."""

    trampoline: int
    size: int
    counter: int = 0


@dataclass
class Registry:
    module_path: str
    module_base: int
    build_id: str | None
    sha256: str
    cave_size: int
    patches: list[AppliedPatch] = field(default_factory=list)
    retired: list[Retired] = field(default_factory=list)
    seq: int = 0
    layout: Layout = field(default=LAYOUT, compare=False)

    @property
    def slot(self) -> int:
        """Offset in the cave of the slot this state is (to be) written to."""
        return self.layout.slots[self.seq % 2]

    def retire(self, patch: AppliedPatch) -> None:
        """Forget a patch, keeping its trampolines (and counters) out of reuse."""
        self.patches.remove(patch)
        self.retired += [Retired(s.trampoline, s.trampoline_size, s.counter) for s in patch.sites]

    def find(self, patch_id: str) -> AppliedPatch | None:
        return next((p for p in self.patches if p.id == patch_id), None)

    def used_counters(self) -> list[int]:
        live = [s.counter for p in self.patches for s in p.sites if s.counter]
        return live + [r.counter for r in self.retired if r.counter]

    def used_ranges(self) -> list[tuple[int, int]]:
        ranges = [(r.trampoline, r.trampoline + r.size) for r in self.retired]
        for patch in self.patches:
            ranges += [(s.trampoline, s.trampoline + s.trampoline_size) for s in patch.sites]
        return sorted(ranges)

    def body(self) -> bytes:
        """The JSON document of this state, as its layout stores it."""
        doc = {
            "module_path": self.module_path,
            "module_base": self.module_base,
            "build_id": self.build_id,
            "sha256": self.sha256,
            "cave_size": self.cave_size,
            "patches": [
                {
                    "id": p.id,
                    "version": p.version,
                    "title": p.title,
                    "applied_at": p.applied_at,
                    "sites": [_site_json(s) for s in p.sites],
                    "state": p.state,
                }
                for p in self.patches
            ],
            "retired": [vars(r) for r in self.retired],
            "seq": self.seq,
        }
        body = json.dumps(doc, separators=(",", ":")).encode()
        if self.layout.compressed:
            body = zlib.compress(body, 6)
        if len(body) > self.layout.capacity:
            raise CaveError(
                f"too many patches for one cave: the registry needs {len(body)} bytes, "
                f"a slot holds {self.layout.capacity}; remove unused patches first"
            )
        return body

    def images(self) -> list[tuple[int, bytes]]:
        """(offset in the cave, bytes) to write, in order, to record this state as `seq`."""
        return self.layout.images(self.seq, self.body())

    def encode(self) -> bytes:
        """This state as one slot's bytes, header and JSON (for tests and tools)."""
        body = self.body()
        return HEADER.pack(self.layout.magic, self.seq, len(body), zlib.crc32(body)) + body

    @classmethod
    def read(cls, read: Callable[[int, int], bytes]) -> Registry | None:
        """The current registry of a cave; `read(offset, size)` reads the cave.

        None if no slot was ever written (not a cave, or one whose creator died
        before recording anything). CaveError if slots exist but none is valid.
        Reads the cave's first page, and an overflow area only when a slot uses it.
        """
        page = read(0, PAGE)
        for layout in (LAYOUT, LAYOUT_V3):
            if layout.magic in {page[at : at + len(MAGIC)] for at in layout.slots}:
                return cls._read(layout, page, read)
        v2 = page[: HEADER.size] + read(LAYOUT_V2.slots[1], HEADER.size)
        if MAGIC_V2 in (v2[: len(MAGIC)], v2[HEADER.size : HEADER.size + len(MAGIC)]):
            return cls._read(LAYOUT_V2, page, read)
        family = MAGIC[:-1]
        newer = {
            page[at + len(family)] for at in (0, *LAYOUT.slots) if page[at:].startswith(family)
        }
        if newer and max(newer) > MAGIC[-1]:
            raise CaveError(
                f"this process's micropatch registry has layout {max(newer)}, written by a "
                f"newer micropatch than this one (which reads layouts up to {MAGIC[-1]}); "
                "use that version for this process"
            )
        heads = {*LAYOUT.slots, *LAYOUT_V3.slots}
        if any(any(page[at : at + HEADER.size]) for at in heads) or any(v2[HEADER.size :]):
            raise CaveError("corrupt micropatch registry: no slot holds a micropatch registry")
        return None

    @classmethod
    def heads(cls, layout: Layout, read: Callable[[int, int], bytes]) -> bytes:
        """Both slots' headers: any new state changes them (its sequence), so equal
        heads prove the registry is the one read before."""
        return b"".join(read(at, HEADER.size) for at in layout.slots)

    @classmethod
    def _read(
        cls, layout: Layout, page: bytes, read: Callable[[int, int], bytes]
    ) -> Registry | None:
        found: list[Registry] = []
        problems = []
        for index, at in enumerate(layout.slots):
            head = page[at : at + HEADER.size] if at < PAGE else read(at, HEADER.size)
            magic, seq, length, crc = HEADER.unpack_from(head)
            if magic != layout.magic:
                if any(head):
                    problems.append(f"slot at +{at:#x}: not a micropatch registry")
                continue
            if length > layout.capacity:
                problems.append(f"slot at +{at:#x}: length {length}")
                continue
            start = layout.body_at(index, length)
            body = page[start : start + length] if start + length <= PAGE else read(start, length)
            if zlib.crc32(body) != crc:
                problems.append(f"slot at +{at:#x}: checksum mismatch (a torn write)")
                continue
            found.append(cls._from_json(body, seq, layout))
        if found:
            return max(found, key=lambda r: r.seq)
        if problems:
            raise CaveError("corrupt micropatch registry: " + "; ".join(problems))
        return None

    @classmethod
    def decode(cls, blob: bytes) -> Registry | None:
        """One slot's bytes as `encode` made them; None if it is not a registry slot."""
        magic, seq, length, crc = HEADER.unpack_from(blob.ljust(HEADER.size, b"\0"))
        layout = {MAGIC: LAYOUT, MAGIC_V3: LAYOUT_V3, MAGIC_V2: LAYOUT_V2}.get(magic)
        body = blob[HEADER.size : HEADER.size + length]
        if layout is None or len(body) != length or zlib.crc32(body) != crc:
            return None
        return cls._from_json(body, seq, layout)

    @classmethod
    def _from_json(cls, body: bytes, seq: int, layout: Layout) -> Registry:
        try:
            doc = json.loads(zlib.decompress(body) if layout.compressed else body)
            patches = [
                AppliedPatch(
                    id=p["id"],
                    version=p["version"],
                    title=p["title"],
                    applied_at=p["applied_at"],
                    sites=[
                        AppliedSite(
                            **{
                                **s,
                                "original": bytes.fromhex(s["original"]),
                                "jump": bytes.fromhex(s["jump"]),
                            }
                        )
                        for s in p["sites"]
                    ],
                    state=p.get("state", APPLIED),
                )
                for p in doc["patches"]
            ]
            return cls(
                module_path=doc["module_path"],
                module_base=doc["module_base"],
                build_id=doc["build_id"],
                sha256=doc["sha256"],
                cave_size=doc["cave_size"],
                patches=patches,
                retired=[Retired(**r) for r in doc.get("retired", [])],
                seq=seq,
                layout=layout,
            )
        except (ValueError, KeyError, TypeError, zlib.error) as e:
            raise CaveError(f"corrupt micropatch registry: {e}") from None


def _site_json(s: AppliedSite) -> dict[str, object]:
    return {
        "patchlet": s.patchlet,
        "address": s.address,
        "original": s.original.hex(),
        "jump": s.jump.hex(),
        "trampoline": s.trampoline,
        "trampoline_size": s.trampoline_size,
        "tail": s.tail,
        "counter": s.counter,
        "copies": s.copies,
        "body": s.body,
        "starts": s.starts,
        "code_hash": s.code_hash,
    }
