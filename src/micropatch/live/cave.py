"""Caves: memory in the target, near a module, that holds its trampolines.

A cave is a memfd named "micropatch" mapped private and read+execute within
±2 GiB of its module (a `jmp rel32` reaches it), so anyone can see a patched
process in /proc/PID/maps. We fill it through /proc/PID/mem (copy-on-write
pages of the tracee), never by mapping code writable. Its first pages hold the
registry and the blocked-event counters, mapped read+write and never
executable; the trampolines follow, read+execute (`registry.Layout`).
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from micropatch.arch.x86_64.abi import (
    SYS_CLOSE,
    SYS_FTRUNCATE,
    SYS_MMAP,
    SYS_MPROTECT,
    SYS_MUNMAP,
)
from micropatch.arch.x86_64.constants import JUMP_REACH as REACH
from micropatch.arch.x86_64.constants import PAGE_SIZE
from micropatch.errors import CaveError, RemoteSyscallError
from micropatch.faults import checkpoint
from micropatch.live.mapped import CAVE_PREFIX
from micropatch.live.registry import LAYOUT, REGISTRY_SIZE, Layout, Registry
from micropatch.process.linux import (
    MAP_FIXED_NOREPLACE,
    MAP_PRIVATE,
    PROT_EXEC,
    PROT_READ,
    PROT_WRITE,
)
from micropatch.process.maps import Mapping
from micropatch.process.memory import Memory

if TYPE_CHECKING:
    from micropatch.live.mapped import LoadedModule
    from micropatch.process.syscall import RemoteSyscalls

CAVE_NAME = b"micropatch\x00"
CAVE_SIZE = 64 * 1024
COUNTER_SIZE = 8

ALIGN = 16
MIN_ADDRESS = 0x10000  # vm.mmap_min_addr default


@dataclass
class Cave:
    address: int
    size: int
    registry: Registry

    def contains(self, address: int) -> bool:
        return self.address <= address < self.address + self.size


def read_caves(memory: Memory, mappings: list[Mapping]) -> list[Cave]:
    """Every micropatch cave in a process, with its registry."""
    caves = []
    for m in mappings:
        if not m.path.startswith(CAVE_PREFIX) or m.offset != 0:
            continue  # offset 0 of the memfd: the cave's start (other mappings of it follow)
        registry = Registry.read(_reader(memory, m.start))
        if registry is not None:
            # The mapping is split (writable registry, then code; or, made by an
            # earlier version, code, then a writable counters page): the registry,
            # not the first mapping, knows the cave's whole size.
            caves.append(Cave(m.start, registry.cave_size, registry))
    return caves


def orphan_caves(memory: Memory, mappings: list[Mapping], caves: list[Cave]) -> list[int]:
    """Caves mapped by a patcher that died before recording anything in them: no
    registry was ever written, so nothing in the process refers to them."""
    orphans: list[int] = []
    for m in mappings:
        if not m.path.startswith(CAVE_PREFIX) or m.offset != 0:
            continue
        if any(c.contains(m.start) for c in caves):
            continue
        if Registry.read(_reader(memory, m.start)) is None:
            orphans.append(m.start)
    return orphans


def _reader(memory: Memory, start: int) -> Callable[[int, int], bytes]:
    return lambda offset, size: memory.read(start + offset, size)


def cave_of(caves: list[Cave], module: LoadedModule) -> Cave | None:
    return next((c for c in caves if c.registry.module_base == module.base), None)


def candidate_addresses(mappings: list[Mapping], module: LoadedModule, size: int) -> list[int]:
    """Free, page-aligned places from which every module byte is within a rel32 jump.

    Below the module first: just above it is where a non-PIE program's heap grows.
    """
    lowest = max(MIN_ADDRESS, module.high - REACH + size)
    highest = module.low + REACH - size
    spans = sorted((m.start, m.end) for m in mappings)
    gaps = []
    previous_end = MIN_ADDRESS
    for start, end in [*spans, (1 << 47, 1 << 47)]:
        if start - previous_end >= size:
            gaps.append((previous_end, start))
        previous_end = max(previous_end, end)
    below, above = [], []
    for gap_start, gap_end in gaps:
        if gap_end <= module.low:
            top = min(gap_end, highest + size) - size
            top -= top % PAGE_SIZE
            if top >= max(gap_start, lowest):
                below.append(top)
        elif gap_start >= module.high:
            low = max(gap_start, lowest)
            low += -low % PAGE_SIZE
            # Leave room for brk(): start a little above the gap's start.
            low += 16 * PAGE_SIZE if low + 16 * PAGE_SIZE + size <= gap_end else 0
            if low + size <= min(gap_end, highest + size):
                above.append(low)
    below.sort(key=lambda a: module.low - a)
    above.sort(key=lambda a: a - module.high)
    return below + above


def map_cave(
    syscalls: RemoteSyscalls,
    memory: Memory,
    mappings: list[Mapping],
    module: LoadedModule,
    layout: Layout = LAYOUT,
) -> int:
    """Create the memfd and map it near the module, its `layout`'s data pages
    writable; returns its address. (An earlier `layout` only in tests: an upgrade
    finds such caves in running processes.)"""
    candidates = candidate_addresses(mappings, module, CAVE_SIZE)
    if not candidates:
        raise CaveError(
            f"no free address range within ±2 GiB of {module.path} in process {module.pid} "
            "for a code cave"
        )
    fd = syscalls.memfd_create(CAVE_NAME)
    checkpoint("memfd-created")
    try:
        syscalls.checked(SYS_FTRUNCATE, fd, CAVE_SIZE)
        for hint in candidates[:8]:
            result = syscalls(
                SYS_MMAP, hint, CAVE_SIZE, PROT_READ | PROT_EXEC,
                MAP_PRIVATE | MAP_FIXED_NOREPLACE, fd, 0,
            )  # fmt: skip
            if result == hint:
                checkpoint("cave-mapped")
                _make_data_writable(syscalls, hint, layout)
                return hint
            if result > 0:  # an old kernel ignored MAP_FIXED_NOREPLACE and put it elsewhere
                syscalls(SYS_MUNMAP, result, CAVE_SIZE)
            elif result != -errno.EEXIST:  # EEXIST: something is there, try the next place
                raise syscalls.error(SYS_MMAP, result)
        raise CaveError(f"could not map a code cave near {module.path} in process {module.pid}")
    finally:
        syscalls(SYS_CLOSE, fd)


def _make_data_writable(syscalls: RemoteSyscalls, cave: int, layout: Layout) -> None:
    """The registry's pages hold blocked-event counters that patchlets increment:
    writable, not executable, so no page of the cave is ever both (W^X)."""
    start, end = layout.writable_area(CAVE_SIZE)
    result = syscalls(SYS_MPROTECT, cave + start, end - start, PROT_READ | PROT_WRITE)
    if result != 0:
        syscalls(SYS_MUNMAP, cave, CAVE_SIZE)
        raise syscalls.error(SYS_MPROTECT, result)


def unmap_cave(syscalls: RemoteSyscalls, cave: Cave) -> None:
    result = syscalls(SYS_MUNMAP, cave.address, cave.size)
    if result != 0:
        raise RemoteSyscallError(
            f"munmap of the cave at {cave.address:#x} in process {syscalls.proc.pid} failed "
            f"({result})"
        )


def allocate_counter(taken: list[int], cave: Cave) -> int:
    """A free 8-byte counter slot in the cave's counter area (writable, not code)."""
    start, end = cave.registry.layout.counter_area(cave.size)
    for slot in range(cave.address + start, cave.address + end, COUNTER_SIZE):
        if slot not in taken:
            return slot
    raise CaveError(f"the cave at {cave.address:#x} has no free blocked-event counter left")


def allocate(
    taken: list[tuple[int, int]],
    cave_address: int,
    cave_size: int,
    size: int,
    *,
    start: int = REGISTRY_SIZE,
) -> int:
    """First free, aligned slot of `size` bytes in the trampoline area of a cave
    (the area begins `start` bytes in, after the registry, and ends `cave_size`
    bytes in: `Layout.code_end`)."""
    cursor = cave_address + start
    for start, end in sorted(taken):
        if start - cursor >= size:
            return cursor
        cursor = max(cursor, end + (-end % ALIGN))
    if cave_address + cave_size - cursor >= size:
        return cursor
    raise CaveError(
        f"the cave at {cave_address:#x} is full ({cave_size - start} bytes of "
        "trampolines); remove unused patches first"
    )
