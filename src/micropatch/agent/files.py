"""Module files as the agent meets them (an exec, a library open): their identity,
computed once per file version.

A file version is (dev, ino, size, mtime_ns): a file rewritten in place gets a
new identity, a file merely opened again does not cost a hash.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import BinaryIO

from micropatch.elf.identity import ModuleIdentity, identify
from micropatch.errors import MicropatchError
from micropatch.patch.view import TargetView

FileKey = tuple[int, int, int, int]  # st_dev, st_ino, st_size, st_mtime_ns


@dataclass(frozen=True)
class ModuleFile:
    """A module file (executable or library) and what it is."""

    path: str
    dev: int
    ino: int
    identity: ModuleIdentity | None  # None: not an ELF file we can identify

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    @property
    def inode(self) -> tuple[int, int]:
        return self.dev, self.ino

    def matches(self, target: TargetView) -> bool:
        """This file is the target's module build: every identity it pins (build-id,
        SHA-256) agrees, whatever the file's name (a wheel's renamed copy, a link)."""
        if self.identity is None:
            return False
        if not target.build_id and not target.sha256:
            return False
        if target.build_id and self.identity.build_id != target.build_id.lower():
            return False
        return not target.sha256 or self.identity.sha256 == target.sha256.lower()


def file_key(st: os.stat_result) -> FileKey:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class FileCache:
    """ModuleFile per file version, bounded (least recently used first out); thread-safe."""

    def __init__(self, max_entries: int = 4096) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[FileKey, ModuleIdentity | None] = OrderedDict()
        self._lock = threading.Lock()

    def of_fd(self, fd: int, path: str) -> ModuleFile:
        """The file open as `fd` (read through a duplicate: no new open of the file,
        which a fanotify mark of ours would report to us)."""
        st = os.fstat(fd)
        found, identity = self._cached(st)
        if not found:
            with os.fdopen(os.dup(fd), "rb") as file:
                identity = self._identify(file)
            self._store(st, identity)
        return ModuleFile(path, st.st_dev, st.st_ino, identity)

    def peek(self, fd: int, path: str) -> ModuleFile | None:
        """The file open as `fd` if its identity is known already (an fstat and a dict
        lookup), else None."""
        st = os.fstat(fd)
        found, identity = self._cached(st)
        return ModuleFile(path, st.st_dev, st.st_ino, identity) if found else None

    def of_path(self, path: str) -> ModuleFile | None:
        """The file at `path`, None if it cannot be opened."""
        try:
            with open(path, "rb") as file:
                st = os.fstat(file.fileno())
                found, identity = self._cached(st)
                if not found:
                    identity = self._identify(file)
                    self._store(st, identity)
        except OSError:
            return None
        return ModuleFile(path, st.st_dev, st.st_ino, identity)

    def _cached(self, st: os.stat_result) -> tuple[bool, ModuleIdentity | None]:
        key = file_key(st)
        with self._lock:
            if key not in self._entries:
                return False, None
            self._entries.move_to_end(key)
            return True, self._entries[key]

    def _store(self, st: os.stat_result, identity: ModuleIdentity | None) -> None:
        with self._lock:
            self._entries[file_key(st)] = identity
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    @staticmethod
    def _identify(file: BinaryIO) -> ModuleIdentity | None:
        try:
            return identify(file)
        except (MicropatchError, OSError):
            return None
