"""The CPython interpreters of a host and the Python modules they imported: what
the agent reports in its inventory and matches Python patches against, read
without stopping any process or running code in it.

An interpreter is a process mapping a `python3.X` executable or `libpython3.X`
of a supported minor version (`states.interpreter_version`); its modules are
the names in its `sys.modules` with a `.py` file (`imports.imported`), each
identified by the SHA-256 of that file as the process sees it
(`/proc/PID/root` + its path), the identity a Python patch's `[target] sha256`
names. A file is hashed once per version of it (device, inode, size, mtime),
within a time budget per scan (what is left is hashed at the next scan), but
the modules a patch targets always.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from micropatch.errors import MicropatchError
from micropatch.process.maps import read_maps
from micropatch.runtimes.cpython.imports import imported
from micropatch.runtimes.cpython.states import interpreter_version
from micropatch.runtimes.cpython.versions import SUPPORTED

log = logging.getLogger(__name__)

HASH_BUDGET = 2.0  # seconds of hashing per scan
MAX_SOURCE = 64 << 20  # a larger "module source" is not hashed


@dataclass(frozen=True)
class Source:
    """A module's source file as one process sees it."""

    path: str
    sha256: str | None  # None: not hashed yet (budget), or unreadable


@dataclass(frozen=True)
class PythonProcess:
    """A running CPython interpreter of a supported version and what it imported."""

    pid: int
    version: str  # the release, "3.11.2"
    modules: dict[str, Source] = field(default_factory=dict)  # by module name

    @property
    def minor(self) -> str:
        return ".".join(self.version.split(".")[:2])


class PythonInventory:
    """Scans of the host's interpreters, remembering file hashes between scans."""

    def __init__(self) -> None:
        self._known: dict[tuple[int, int, int, int], str] = {}

    def interpreters(
        self, pids: list[int] | None = None, needed: Collection[str] = ()
    ) -> list[PythonProcess]:
        """The supported interpreters among `pids` (None: every process). The modules
        named in `needed` (those patches target) are hashed whatever the budget."""
        budget = time.monotonic() + HASH_BUDGET
        found = []
        for pid in pids if pids is not None else _all_pids():
            try:
                if interpreter_version(read_maps(pid)) not in SUPPORTED:
                    continue
                read = imported(pid)
            except MicropatchError as e:
                log.debug("process %d: its Python modules cannot be read: %s", pid, e)
                continue
            modules = {
                name: Source(path, self._hash(pid, path, None if name in needed else budget))
                for name, path in read.modules.items()
                if path is not None and path.endswith(".py")
            }
            found.append(PythonProcess(pid, read.version, modules))
        return found

    def modules(self, interpreters: list[PythonProcess]) -> list[dict[str, Any]]:
        """The modules of `interpreters` in the check-in's form (as the ELF modules,
        without a build-id), one per file version."""
        rows: dict[tuple[str, str], dict[str, Any]] = {}
        for p in interpreters:
            for name, source in p.modules.items():
                if source.sha256 is not None:
                    rows[(source.path, source.sha256)] = {
                        "name": name[:255], "path": source.path[:1024], "build_id": None,
                        "sha256": source.sha256,
                    }  # fmt: skip
        return list(rows.values())

    def _hash(self, pid: int, path: str, budget: float | None) -> str | None:
        try:
            with open(f"/proc/{pid}/root{path}", "rb") as f:
                st = os.fstat(f.fileno())
                key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
                known = self._known.get(key)
                if known is None:
                    over = budget is not None and time.monotonic() > budget
                    if over or st.st_size > MAX_SOURCE:
                        return None
                    known = self._known[key] = hashlib.sha256(f.read()).hexdigest()
                return known
        except OSError:
            return None


def _all_pids() -> list[int]:
    own = os.getpid()
    return sorted(int(d) for d in os.listdir("/proc") if d.isdigit() and int(d) != own)
