"""The registry: what is applied to a process, kept in the first page(s) of its cave.

The state of a process lives in the process, so any later command, or an
agent restarted after a crash, reads it back from memory instead of trusting
a file of ours. It is a small header and a JSON document.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from micropatch.errors import CaveError

MAGIC = b"MICROPATCH\x00\x01"
HEADER = struct.Struct("<12sI")  # magic, JSON length
REGISTRY_SIZE = 4 * 4096  # only the pages the JSON touches become resident


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


@dataclass
class AppliedPatch:
    id: str
    version: int
    title: str
    applied_at: float  # Unix time
    sites: list[AppliedSite]


@dataclass
class Registry:
    module_path: str
    module_base: int
    build_id: str | None
    sha256: str
    cave_size: int
    patches: list[AppliedPatch] = field(default_factory=list)

    def find(self, patch_id: str) -> AppliedPatch | None:
        return next((p for p in self.patches if p.id == patch_id), None)

    def used_counters(self) -> list[int]:
        return [s.counter for p in self.patches for s in p.sites if s.counter]

    def used_ranges(self) -> list[tuple[int, int]]:
        return sorted(
            (s.trampoline, s.trampoline + s.trampoline_size) for p in self.patches for s in p.sites
        )

    def encode(self) -> bytes:
        doc = asdict(self)
        for patch in doc["patches"]:
            for site in patch["sites"]:
                site["original"] = site["original"].hex()
                site["jump"] = site["jump"].hex()
        body = json.dumps(doc, separators=(",", ":")).encode()
        blob = HEADER.pack(MAGIC, len(body)) + body
        if len(blob) > REGISTRY_SIZE:
            raise CaveError(
                f"too many patches for one cave: the registry needs {len(blob)} bytes, "
                f"the cave holds {REGISTRY_SIZE}; remove unused patches first"
            )
        return blob

    @classmethod
    def decode(
        cls, head: bytes, read_more: Callable[[int], bytes] | None = None
    ) -> Registry | None:
        """Parse a registry from the first bytes of a cave; None if it is not one of ours.

        `read_more(n)` returns the first n bytes when the JSON is longer than `head`.
        """
        if len(head) < HEADER.size:
            return None
        magic, length = HEADER.unpack_from(head)
        if magic != MAGIC:
            return None
        if length > REGISTRY_SIZE - HEADER.size:
            raise CaveError(f"corrupt micropatch registry: length {length}")
        if HEADER.size + length > len(head):
            if read_more is None:
                raise CaveError("micropatch registry truncated")
            head = read_more(HEADER.size + length)
        try:
            doc = json.loads(head[HEADER.size : HEADER.size + length])
            patches = [
                AppliedPatch(
                    id=p["id"],
                    version=p["version"],
                    title=p["title"],
                    applied_at=p["applied_at"],
                    sites=[
                        AppliedSite(
                            patchlet=s["patchlet"],
                            address=s["address"],
                            original=bytes.fromhex(s["original"]),
                            jump=bytes.fromhex(s["jump"]),
                            trampoline=s["trampoline"],
                            trampoline_size=s["trampoline_size"],
                            tail=s.get("tail", 0),
                            counter=s.get("counter", 0),
                            copies=list(s.get("copies", [])),
                            body=list(s.get("body", [])),
                            starts=list(s.get("starts", [])),
                        )
                        for s in p["sites"]
                    ],
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
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CaveError(f"corrupt micropatch registry: {e}") from None
