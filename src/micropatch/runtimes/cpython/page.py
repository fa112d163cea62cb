"""The page micropatch keeps in a patched interpreter: code, state, registry.

One memfd named `cpython-micropatch` per process, mapped private: its first
page holds the trampoline code (read+execute), the rest is read+write and
never executable (W^X). `/proc/PID/maps` shows it as
`/memfd:cpython-micropatch (deleted)`; the name does not start with
`micropatch`, so the native engine never takes it for one of its caves.

    CODE      0x0000  trampolines (runtimes/cpython/trampoline.py), then C strings
    HEADER    0x1000  magic, state word, operation, commit objects, lengths
    COUNTERS  0x2000  blocked-attempt counters, 8 bytes each
    SLOT0/1   0x3000  the registry, two slots: u32 length, SHA-256, JSON
    RESULT            the runner's report of the last operation (JSON)
    PAYLOAD           the runner's source text, NUL-terminated
    INPUT             the operation for the runner (marshal)

The page is never unmapped: a pending call queued in the interpreter, or a
thread we sent into the trampoline, may still reach it long after the
operation that armed it, whatever became of that operation.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

from micropatch.process.maps import Mapping
from micropatch.process.memory import Memory

NAME = b"cpython-micropatch\x00"
MAPS_NAME = "/memfd:cpython-micropatch"
MAGIC = b"MPCPYTH\x01"
SIZE = 0x100000

CODE = 0x0000
HEADER = 0x1000
COUNTERS = 0x2000
COUNTERS_SIZE = 0x1000
SLOT_SIZE = 0x10000
SLOTS = (0x3000, 0x13000)
SLOT_HEADER = 36  # u32 length, SHA-256 of the JSON
RESULT = 0x23000
RESULT_SIZE = 0x10000
PAYLOAD = 0x33000
PAYLOAD_SIZE = 0x20000
INPUT = 0x53000
INPUT_SIZE = SIZE - INPUT
DATA_SIZE = SIZE - HEADER  # what the runner sees, as a memoryview starting at HEADER

# Header fields, offsets from HEADER.
H_MAGIC = 0
H_STATE = 16  # u32, see the states below: the one word both sides change
H_SEQUENCE = 20  # u32: the operation armed last
H_KIND = 24  # u32: how the runner was entered (ENTRY_*), written by the trampoline
H_PREPARED = 28  # u32: 1 once the runner has prepared the commit
H_COMMIT = 32  # 4 x u64: commit callable, its args, rollback callable, its args
H_SELECTOR = 64  # u32: the registry slot in force (written by the commit only)
H_RESULT_LEN = 72
H_INPUT_LEN = 76
H_HIJACK = 80  # u32: offset of the trampoline's `hijack` entry in the page

# The state word. The patcher writes it only with every thread stopped, and only
# ARMED -> CANCELLED and PREPARING -> CANCELLING; the trampoline moves it with
# `lock cmpxchg` (claim, commit) or, from states only it can be in, plain stores.
IDLE, ARMED, PREPARING, COMMITTING, COMMITTED, FAILED, CANCELLING, CANCELLED, BROKEN = range(9)
STATE_NAMES = ("idle", "armed", "preparing", "committing", "committed", "failed",
               "cancelling", "cancelled", "broken")  # fmt: skip
TERMINAL = frozenset({IDLE, COMMITTED, FAILED, CANCELLED, BROKEN})
ENTRY_PENDING, ENTRY_HIJACK = 1, 2


@dataclass(frozen=True)
class Page:
    address: int

    def at(self, offset: int) -> int:
        return self.address + offset

    @property
    def state_address(self) -> int:
        return self.address + HEADER + H_STATE

    def read_u32(self, memory: Memory, field: int) -> int:
        value: int = struct.unpack("<I", memory.read(self.address + HEADER + field, 4))[0]
        return value

    def write_u32(self, memory: Memory, field: int, value: int) -> None:
        memory.write(self.address + HEADER + field, struct.pack("<I", value))

    def state(self, memory: Memory) -> int:
        return self.read_u32(memory, H_STATE)

    def initialized(self, memory: Memory) -> bool:
        return memory.read(self.address + HEADER, len(MAGIC)) == MAGIC

    def registry(self, memory: Memory) -> dict[str, Any]:
        """The registry in force: `{"patches": [...]}`; empty if never written."""
        selector = self.read_u32(memory, H_SELECTOR)
        if selector not in (0, 1):
            raise ValueError(f"registry selector {selector}")
        slot = self.address + SLOTS[selector]
        length = struct.unpack("<I", memory.read(slot, 4))[0]
        if length == 0:
            return {"patches": []}
        if length > SLOT_SIZE - SLOT_HEADER:
            raise ValueError(f"registry slot length {length}")
        data = memory.read(slot + SLOT_HEADER, length)
        if hashlib.sha256(data).digest() != memory.read(slot + 4, 32):
            raise ValueError("registry slot checksum mismatch")
        document: dict[str, Any] = json.loads(data)
        return document

    def offsets(self) -> dict[str, Any]:
        """Where the runner finds and leaves things, relative to its view (at HEADER)."""
        return {
            "prepared": H_PREPARED, "commit": H_COMMIT, "selector": H_SELECTOR,
            "slots": [s - HEADER for s in SLOTS], "slot_size": SLOT_SIZE,
            "counters": COUNTERS - HEADER, "counters_size": COUNTERS_SIZE,
            "result": RESULT - HEADER, "result_size": RESULT_SIZE, "result_len": H_RESULT_LEN,
        }  # fmt: skip

    def result(self, memory: Memory) -> dict[str, Any]:
        length = self.read_u32(memory, H_RESULT_LEN)
        if not 0 < length <= RESULT_SIZE:
            return {}
        document: dict[str, Any] = json.loads(memory.read(self.address + RESULT, length))
        return document

    def counter(self, memory: Memory, offset: int) -> int:
        """A blocked-attempt counter, at `offset` in the runner's view (as the registry says)."""
        value: int = struct.unpack("<Q", memory.read(self.address + HEADER + offset, 8))[0]
        return value


def find_pages(mappings: list[Mapping]) -> list[int]:
    """Addresses of the process's pages (more than one only after a patcher died
    between mapping one and initializing it)."""
    return [m.start for m in mappings if m.path.startswith(MAPS_NAME) and m.offset == 0]
