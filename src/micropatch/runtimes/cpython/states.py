"""What is applied where, read from the pages in the processes, and which
processes `--all` concerns: without stopping any process or running any code.

The registry slot in force is chosen by a selector the commit writes last,
after the slot was complete; a slot rewritten while it is read (a later
operation's) fails its SHA-256 and is read again.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from micropatch.errors import MemoryAccessError, MicropatchError
from micropatch.process.maps import Mapping, read_maps
from micropatch.process.memory import Memory
from micropatch.process.procfs import process_name
from micropatch.runtimes.base import PatchState
from micropatch.runtimes.cpython import page as P

READ_ATTEMPTS = 3
_INTERPRETER = re.compile(r"(lib)?python(?P<version>3\.\d+)(\.so(\.[\d.]+)?)?$")


@dataclass(frozen=True)
class InFlight:
    """An operation not finished in a process: its state word and sequence."""

    state: str
    sequence: int


def status(pid: int) -> list[PatchState]:
    """The Python patches applied to one process."""
    return read(pid)[0]


def read(pid: int) -> tuple[list[PatchState], InFlight | None]:
    """The patches applied, and an operation in flight if there is one."""
    for attempt in range(READ_ATTEMPTS):
        pages = P.find_pages(read_maps(pid))
        if not pages:
            return [], None
        try:
            with Memory(pid, writable=False) as memory:
                return _read_page(pid, memory, P.Page(pages[0]))
        except (ValueError, MemoryAccessError):
            if attempt == READ_ATTEMPTS - 1:
                raise MemoryAccessError(
                    f"process {pid}: cannot read the Python patches registry (still changing, "
                    "or corrupt)", pid=pid,
                ) from None  # fmt: skip
    return [], None


def _read_page(pid: int, memory: Memory, page: P.Page) -> tuple[list[PatchState], InFlight | None]:
    if not page.initialized(memory):
        return [], None
    document = page.registry(memory)
    name = process_name(pid)
    states = []
    for entry in document.get("patches", []):
        counter = entry.get("counter")
        states.append(
            PatchState(
                pid=pid,
                process=name,
                module=str(entry["module"]),
                patch_id=str(entry["id"]),
                version=int(entry["version"]),
                title=str(entry.get("title") or ""),
                applied_at=float(entry.get("applied_at", 0.0)),
                sites=tuple(str(f) for f in entry.get("functions", [])),
                blocked=None if counter is None else page.counter(memory, int(counter)),
            )
        )
    state = page.state(memory)
    flight = None
    if state not in P.TERMINAL:
        flight = InFlight(P.STATE_NAMES[state], page.read_u32(memory, P.H_SEQUENCE))
    return states, flight


def _pids() -> list[int]:
    return sorted(int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != os.getpid())


def patched_pids() -> list[int]:
    """Processes that hold an interpreter page (patched now, or once)."""
    return [pid for pid in _pids() if _maps_contain(pid, P.MAPS_NAME)]


def interpreter_version(mappings: list[Mapping]) -> str | None:
    """The CPython minor version a process maps ("3.11"), by its interpreter's file name."""
    for m in mappings:
        found = _INTERPRETER.match(m.name) if m.inode and m.offset == 0 else None
        if found:
            return found["version"]
    return None


def interpreter_pids(version: str) -> list[int]:
    """Processes running a CPython of this minor version (the module's presence is
    checked inside each, by the operation)."""
    found = []
    for pid in _pids():
        try:
            if interpreter_version(read_maps(pid)) == version:
                found.append(pid)
        except MicropatchError:
            continue
    return found


def _maps_contain(pid: int, needle: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return needle in f.read()
    except OSError:
        return False


def carriers(patch_id: str, pids: list[int] | None) -> list[int]:
    """Of `pids` (None: every process), those whose interpreter page records `patch_id`."""
    found = []
    for pid in pids if pids is not None else patched_pids():
        try:
            if any(s.patch_id == patch_id for s in status(pid)):
                found.append(pid)
        except MicropatchError:
            continue
    return found
