"""Target memory through /proc/PID/mem.

The kernel lets a tracer write through /proc/PID/mem into pages the target
maps read+execute (a private copy-on-write of the page is made), which is how
we keep the target's W^X: nothing is ever mapped writable and executable.
"""

from __future__ import annotations

import errno
import os

from micropatch.errors import MemoryAccessError, ProcessExited
from micropatch.process.procfs import permission_denied


class Memory:
    def __init__(self, pid: int, *, writable: bool = True) -> None:
        self.pid = pid
        try:
            self._fd = os.open(f"/proc/{pid}/mem", os.O_RDWR if writable else os.O_RDONLY)
        except (FileNotFoundError, ProcessLookupError):
            raise ProcessExited(f"process {pid} exited during the operation") from None
        except PermissionError:
            raise permission_denied(pid, f"cannot open /proc/{pid}/mem") from None

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Memory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def read(self, address: int, size: int) -> bytes:
        try:
            data = os.pread(self._fd, size, address)
        except OSError as e:
            raise self._error("read", address, size, e) from None
        if len(data) != size:
            raise MemoryAccessError(
                f"process {self.pid}: short read at {address:#x} ({len(data)} of {size} bytes)"
            )
        return data

    def write(self, address: int, data: bytes) -> None:
        try:
            written = os.pwrite(self._fd, data, address)
        except OSError as e:
            raise self._error("write", address, len(data), e) from None
        if written != len(data):
            raise MemoryAccessError(
                f"process {self.pid}: short write at {address:#x} ({written} of {len(data)} bytes)"
            )

    def _error(self, op: str, address: int, size: int, e: OSError) -> Exception:
        if e.errno == errno.ESRCH or not os.path.exists(f"/proc/{self.pid}"):
            return ProcessExited(f"process {self.pid} exited during the operation")
        return MemoryAccessError(
            f"process {self.pid}: cannot {op} {size} bytes at {address:#x}: {e.strerror}"
        )
