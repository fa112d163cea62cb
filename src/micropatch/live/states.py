"""What is applied where, read from the registries in the processes themselves.

Reading needs no stop: the registry is only ever written with every thread
of the target stopped, and a torn read is simply retried.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from micropatch.errors import CaveError, MemoryAccessError, MicropatchError
from micropatch.live.cave import COUNTER_SIZE, read_caves
from micropatch.live.mapped import CAVE_PREFIX, module_groups
from micropatch.live.registry import AppliedPatch
from micropatch.process.maps import read_maps
from micropatch.process.memory import Memory
from micropatch.process.procfs import process_name

READ_ATTEMPTS = 3


@dataclass(frozen=True)
class PatchState:
    pid: int
    process: str
    module: str
    patch_id: str
    version: int
    title: str
    applied_at: float
    sites: tuple[int, ...]
    cave: int
    blocked: int | None  # exploit attempts its patchlets recorded; None: it records none
    state: str = "applied"  # "applying"/"removing": a patcher was killed midway (repair)
    counters: tuple[int, ...] = ()  # addresses of its blocked counters (`read_counters`)


def status(pid: int) -> list[PatchState]:
    """The patches applied to one process."""
    for attempt in range(READ_ATTEMPTS):
        mappings = read_maps(pid)
        if not any(m.path.startswith(CAVE_PREFIX) for m in mappings):
            return []
        try:
            with Memory(pid, writable=False) as memory:
                caves = read_caves(memory, mappings)
                states = [
                    PatchState(
                        pid,
                        process_name(pid),
                        cave.registry.module_path,
                        p.id,
                        p.version,
                        p.title,
                        p.applied_at,
                        tuple(s.address for s in p.sites),
                        cave.address,
                        _blocked(memory, p),
                        p.state,
                        tuple(s.counter for s in p.sites if s.counter),
                    )
                    for cave in caves
                    for p in cave.registry.patches
                ]
            return states
        except (CaveError, MemoryAccessError):
            # Read while a patcher changed the process: a registry half written, or a
            # cave unmapped (a patch removed) since the maps were read. Read again.
            if attempt == READ_ATTEMPTS - 1:
                raise
    return []


def _blocked(memory: Memory, patch: AppliedPatch) -> int | None:
    """The sum of the patch's blocked-event counters, read from the process."""
    counters = [s.counter for s in patch.sites if s.counter]
    if not counters:
        return None
    return sum(int.from_bytes(memory.read(c, COUNTER_SIZE), "little") for c in counters)


def read_counters(pid: int, counters: tuple[int, ...]) -> int:
    """The sum of these blocked counters of process pid (addresses from a PatchState):
    one read each, no maps or registry parsed. A cave unmapped since raises
    ProcessError (the caller reads the full `status` again)."""
    with Memory(pid, writable=False) as memory:
        return sum(int.from_bytes(memory.read(c, COUNTER_SIZE), "little") for c in counters)


def _pids() -> list[int]:
    return sorted(int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != os.getpid())


def patched_pids() -> list[int]:
    """Processes that hold a micropatch cave."""
    return [pid for pid in _pids() if _maps_contain(pid, CAVE_PREFIX)]


def pids_mapping(module: str) -> list[int]:
    """Processes that map a file with this base name (identity is checked on apply)."""
    found = []
    for pid in _pids():
        try:
            if module_groups(read_maps(pid), module):
                found.append(pid)
        except MicropatchError:
            continue  # gone, or not ours to read
    return found


def _maps_contain(pid: int, needle: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return needle in f.read()
    except OSError:
        return False
