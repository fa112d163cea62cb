"""A journal of the changes made to one stopped process, undone on any failure.

Every write records the bytes it replaces, every cave we map records how to
unmap it; rollback replays the journal backwards, so a failure at any step
leaves the target exactly as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from micropatch.errors import MemoryAccessError
from micropatch.process.maps import Mapping
from micropatch.process.syscall import RemoteSyscalls
from micropatch.process.world import StoppedProcess

log = logging.getLogger(__name__)


class Transaction:
    def __init__(self, proc: StoppedProcess, mappings: list[Mapping]) -> None:
        self.proc = proc
        self.memory = proc.memory
        self.mappings = mappings
        self.syscalls = RemoteSyscalls(proc, mappings)
        self._undo: list[Callable[[], None]] = []
        self._written: list[tuple[int, bytes]] = []

    def write(self, address: int, data: bytes) -> None:
        old = self.memory.read(address, len(data))
        log.debug("process %d: write %d bytes at %#x", self.proc.pid, len(data), address)
        self.memory.write(address, data)
        self._undo.append(lambda: self.memory.write(address, old))
        self._written.append((address, data))

    def on_rollback(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def verify(self) -> None:
        """Read back everything written; the kernel said yes, but check.

        A later write may cover an earlier one (update restores a site, then
        patches it again), so each range is compared with the final bytes.
        """
        final: dict[int, int] = {}
        for address, data in self._written:
            final.update(zip(range(address, address + len(data)), data, strict=True))
        for address, data in self._written:
            wanted = bytes(final[a] for a in range(address, address + len(data)))
            found = self.memory.read(address, len(data))
            if found != wanted:
                raise MemoryAccessError(
                    f"process {self.proc.pid}: read-back at {address:#x} found {found.hex(' ')}, "
                    f"wrote {wanted.hex(' ')}"
                )

    def close(self) -> None:
        """End of the transaction, after commit or rollback: put back what the remote
        system calls borrowed (their stub's padding)."""
        self.syscalls.close()

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
