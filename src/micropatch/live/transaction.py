"""A journal of the changes made to one stopped process, undone on any failure.

Every write records the bytes it replaces, every cave we map records how to
unmap it; rollback replays the journal backwards, so a failure at any step
leaves the target exactly as it was.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

from micropatch.errors import MemoryAccessError
from micropatch.faults import checkpoint
from micropatch.process.maps import Mapping, read_maps
from micropatch.process.syscall import RemoteSyscalls
from micropatch.process.world import StoppedProcess

log = logging.getLogger(__name__)


class Transaction:
    def __init__(self, proc: StoppedProcess, mappings: list[Mapping] | None = None) -> None:
        """`mappings`: the process's maps as read in this stop, or None to read them only
        if something needs them (a remote system call, a stack scan)."""
        self.proc = proc
        self.memory = proc.memory
        self._mappings = mappings
        self._syscalls: RemoteSyscalls | None = None
        self._undo: list[Callable[[], None]] = []
        self._written: list[tuple[int, bytes]] = []

    @property
    def mappings(self) -> list[Mapping]:
        if self._mappings is None:
            self._mappings = read_maps(self.proc.pid)
        return self._mappings

    @property
    def syscalls(self) -> RemoteSyscalls:
        """System calls made by a borrowed thread (chosen, and its stub placed, on first use)."""
        if self._syscalls is None:
            self._syscalls = RemoteSyscalls(self.proc, self.mappings)
        return self._syscalls

    def write(self, address: int, data: bytes) -> None:
        old = self.memory.read(address, len(data))
        log.debug("process %d: write %d bytes at %#x", self.proc.pid, len(data), address)
        self.memory.write(address, data)
        self._undo.append(lambda: self.memory.write(address, old))
        self._written.append((address, data))
        # Fault injection: the tests kill the patcher after each write of a stop in turn
        # ("write-N"; "lone-write-N" in a stop of one thread, `lone_thread`).
        self.proc.writes += 1
        if self.proc.lone:
            checkpoint("lone-write-{index}", index=self.proc.writes)
        else:
            checkpoint("write-{index}", index=self.proc.writes)

    def on_rollback(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def verify(self) -> None:
        """Read back everything written, one read per run of adjacent bytes; the kernel
        said yes, but check.

        A later write may cover an earlier one (update restores a site, then
        patches it again): each run is compared with its final bytes.
        """
        for start, wanted in final_runs(self._written):
            found = self.memory.read(start, len(wanted))
            if found != wanted:
                at = next(i for i, (a, b) in enumerate(zip(found, wanted, strict=True)) if a != b)
                raise MemoryAccessError(
                    f"process {self.proc.pid}: read-back at {start + at:#x} found "
                    f"{found[at : at + 16].hex(' ')}, wrote {wanted[at : at + 16].hex(' ')}"
                )

    def close(self) -> None:
        """End of the transaction, after commit or rollback: put back what the remote
        system calls borrowed (their stub's padding)."""
        if self._syscalls is not None:
            self._syscalls.close()

    def rollback(self) -> list[Exception]:
        """Undo everything, newest first; returns what could not be undone."""
        failures = []
        log.debug("process %d: rolling back %d changes", self.proc.pid, len(self._undo))
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception as e:  # keep undoing the rest whatever happens
                failures.append(e)
        self._undo.clear()
        self._written.clear()
        return failures


def final_runs(writes: list[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    """The bytes `writes` leave in memory, applied in order, as (start, bytes) runs of
    adjacent or overlapping writes, lowest first."""
    runs: list[tuple[int, int]] = []
    for start, end in sorted((a, a + len(d)) for a, d in writes):
        if runs and start <= runs[-1][1]:
            runs[-1] = (runs[-1][0], max(runs[-1][1], end))
        else:
            runs.append((start, end))
    images = {start: bytearray(end - start) for start, end in runs}
    starts = [start for start, _ in runs]
    for address, data in writes:
        run = starts[bisect.bisect_right(starts, address) - 1]
        images[run][address - run : address - run + len(data)] = data
    return [(start, bytes(images[start])) for start in starts]
