"""What a transaction reads and decides before the stop, and the check inside it.

Reading the maps and the registries, laying out and assembling trampolines and
encoding the registry images are most of a transaction's work, and none of it
needs the target stopped. `prepare` does it with the process running, under
the process's lock (`live.lock`): no other micropatch operation can write a
registry meanwhile. Inside the stop, `Prepared.holds` reads each registry's two
slot headers again (48 bytes a cave): every state written bumps a sequence
number in one of them, so equal headers prove the registry is the one the
decision was made from, and the decision stands. Otherwise, or when a killed
patcher left something to recover, the engine reads and decides again inside
the stop (`Prepared.commit` is None).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from micropatch.arch.x86_64.abi import STUB
from micropatch.errors import CaveError, MemoryAccessError, MicropatchError
from micropatch.live.cave import Cave, cave_of, read_caves
from micropatch.live.decide import Change, Commit, decide, expected_sites, find_applied, refuse
from micropatch.live.mapped import LoadedModule
from micropatch.live.recovery import leftovers
from micropatch.live.registry import Registry
from micropatch.process.maps import Mapping, read_maps
from micropatch.process.memory import Memory
from micropatch.process.procfs import process_name
from micropatch.process.stub import slack

if TYPE_CHECKING:  # the planner, the assembler and the patch models load only where used
    from micropatch.live.placed import Placed


@dataclass
class Prepared:
    """One reading of a process, taken while it runs, and what was decided from it."""

    caves: list[Cave]
    heads: dict[int, bytes]  # each cave's slot headers as read
    commit: Commit | None  # None: decide inside the stop
    stub: range  # where a remote system call's stub goes (empty: no room found)
    needs_cave: bool = False  # the change adds a patch to a module that has no cave yet

    def holds(self, memory: Memory) -> bool:
        """Inside the stop: every registry is still the one read (see the module doc)."""
        try:
            for cave in self.caves:
                now = Registry.heads(cave.registry.layout, _reader(memory, cave.address))
                if now != self.heads[cave.address]:
                    return False
            return True
        except MemoryAccessError:  # a cave unmapped meanwhile
            return False


def stub_range(memory: Memory, mappings: list[Mapping]) -> range:
    """Where `process.syscall` puts its stub. A thread found there is finishing a system
    call of a patcher killed mid-call, which the stop must let it complete first."""
    at = slack(memory, mappings, len(STUB))
    return range(at, at + len(STUB)) if at is not None else range(0)


def prepare(
    change: Change,
    module: LoadedModule | None = None,
    planned: list[Placed] | None = None,
) -> Prepared:
    """Read the process as it runs and decide the change from that reading, if it can
    be: nothing to recover, a cave to put the patch in, no error. Never raises for the
    change itself: what it cannot decide, the stop decides (and reports)."""
    pid = change.pid
    mappings = read_maps(pid)
    dirty = leftovers(pid, mappings)
    with Memory(pid, writable=False) as memory:
        stub = stub_range(memory, mappings)
        try:
            caves = read_caves(memory, mappings)
            heads = {
                c.address: Registry.heads(c.registry.layout, _reader(memory, c.address))
                for c in caves
            }
        except (CaveError, MemoryAccessError):
            return Prepared([], {}, None, stub)  # the stop reads again, and says what is wrong
        prepared = Prepared(caves, heads, None, stub)
        if dirty:
            return prepared
        name = process_name(pid)
        try:
            if module is not None and cave_of(caves, module) is None:
                _, old = find_applied(caves, change.remove) if change.remove else (None, None)
                refuse(change, name, caves, old)
                assert planned is not None
                prepared.needs_cave = all(
                    memory.read(c.address, len(c.expected)) == c.expected
                    for c in expected_sites(planned, old)
                )
                return prepared
            prepared.commit = decide(change, caves, name, module, planned)
        except MicropatchError:
            pass  # decided again in the stop, which raises it with the process stopped
    return prepared


def provided(
    change: Change,
    module: LoadedModule,
    planned: list[Placed],
    first: Prepared,
    cave: int,
) -> Prepared:
    """`prepare` again once `live.provision` has mapped an empty cave at `cave` for the
    reading `first` (which found it needed), without reading the whole process again.

    The maps, the leftovers of a killed patcher (none, or no cave would have been made)
    and the stub's place were read before the cave was made, and the process's lock has
    kept every other micropatch operation out since: only the registries can have
    changed, and they are read again, the new cave's included, by address. The change is
    decided from them; the stop checks, as after `prepare`, that they still hold."""
    with Memory(change.pid, writable=False) as memory:
        caves = []
        try:
            for address in [*(c.address for c in first.caves), cave]:
                registry = Registry.read(_reader(memory, address))
                if registry is None:  # not as provisioned: read everything again
                    return prepare(change, module, planned)
                caves.append(Cave(address, registry.cave_size, registry))
            heads = {
                c.address: Registry.heads(c.registry.layout, _reader(memory, c.address))
                for c in caves
            }
        except (CaveError, MemoryAccessError):
            return Prepared([], {}, None, first.stub)  # the stop reads again
        prepared = Prepared(caves, heads, None, first.stub)
        # What cannot be decided here is decided again in the stop, which raises it.
        with contextlib.suppress(MicropatchError):
            prepared.commit = decide(change, caves, process_name(change.pid), module, planned)
    return prepared


def _reader(memory: Memory, start: int) -> Callable[[int, int], bytes]:
    return lambda offset, size: memory.read(start + offset, size)
