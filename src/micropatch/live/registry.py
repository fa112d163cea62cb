"""The registry: what is applied to a process, kept in the first pages of its cave.

The state of a process lives in the process, so any later command, or an
agent restarted after a crash, reads it back from memory instead of trusting
a file of ours. It is a JSON document in one of two slots, each with a header
(magic, sequence number, length, CRC-32): a writer always writes the slot the
current state is *not* in, so a patcher killed mid-write leaves the previous
slot intact, and a reader takes the valid slot with the highest sequence.

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
from dataclasses import asdict, dataclass, field

from micropatch.errors import CaveError

MAGIC = b"MICROPATCH\x00\x02"
HEADER = struct.Struct("<12sQII")  # magic, sequence, JSON length, CRC-32 of the JSON
SLOT_SIZE = 2 * 4096
REGISTRY_SIZE = 2 * SLOT_SIZE  # only the pages the JSON touches become resident
APPLYING, APPLIED, REMOVING = "applying", "applied", "removing"


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

    @property
    def slot(self) -> int:
        """Offset in the cave of the slot this state is (to be) written to."""
        return (self.seq % 2) * SLOT_SIZE

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

    def encode(self) -> bytes:
        """The slot's bytes: header and JSON (write them at `self.slot`)."""
        doc = asdict(self)
        for patch in doc["patches"]:
            for site in patch["sites"]:
                site["original"] = site["original"].hex()
                site["jump"] = site["jump"].hex()
        body = json.dumps(doc, separators=(",", ":")).encode()
        blob = HEADER.pack(MAGIC, self.seq, len(body), zlib.crc32(body)) + body
        if len(blob) > SLOT_SIZE:
            raise CaveError(
                f"too many patches for one cave: the registry needs {len(blob)} bytes, "
                f"a slot holds {SLOT_SIZE}; remove unused patches first"
            )
        return blob

    @classmethod
    def read(cls, read: Callable[[int, int], bytes]) -> Registry | None:
        """The current registry of a cave; `read(offset, size)` reads the cave.

        None if no slot was ever written (not a cave, or one whose creator died
        before recording anything). CaveError if slots exist but none is valid.
        """
        found: list[Registry] = []
        problems = []
        for slot in (0, SLOT_SIZE):
            head = read(slot, HEADER.size)
            magic, seq, length, crc = HEADER.unpack_from(head)
            if magic != MAGIC:
                if any(head):
                    problems.append(f"slot at +{slot:#x}: not a micropatch registry")
                continue
            if length > SLOT_SIZE - HEADER.size:
                problems.append(f"slot at +{slot:#x}: length {length}")
                continue
            body = read(slot + HEADER.size, length)
            if zlib.crc32(body) != crc:
                problems.append(f"slot at +{slot:#x}: checksum mismatch (a torn write)")
                continue
            found.append(cls._from_json(body, seq))
        if found:
            return max(found, key=lambda r: r.seq)
        if problems:
            raise CaveError("corrupt micropatch registry: " + "; ".join(problems))
        return None

    @classmethod
    def decode(cls, blob: bytes) -> Registry | None:
        """One slot's bytes as `encode` made them; None if it is not a registry slot."""
        return cls.read(lambda offset, size: blob[offset : offset + size].ljust(size, b"\0"))

    @classmethod
    def _from_json(cls, body: bytes, seq: int) -> Registry:
        try:
            doc = json.loads(body)
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
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CaveError(f"corrupt micropatch registry: {e}") from None
