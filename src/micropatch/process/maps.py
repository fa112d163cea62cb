"""Parsing of /proc/PID/maps."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from micropatch.errors import MicropatchError
from micropatch.process.procfs import read_proc_text
from micropatch.process.select import all_pids

DELETED_SUFFIX = " (deleted)"


@dataclass(frozen=True)
class Mapping:
    start: int
    end: int
    perms: str  # e.g. "r-xp"
    offset: int
    dev: str  # "major:minor" in hex, as the kernel prints it
    inode: int
    path: str  # "" for anonymous mappings; "[stack]", "[vdso]" for special ones

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def readable(self) -> bool:
        return self.perms[0] == "r"

    @property
    def executable(self) -> bool:
        return self.perms[2] == "x"

    @property
    def deleted(self) -> bool:
        return self.path.endswith(DELETED_SUFFIX)

    @property
    def file_path(self) -> str:
        """The path without the kernel's " (deleted)" marker."""
        return self.path[: -len(DELETED_SUFFIX)] if self.deleted else self.path

    @property
    def name(self) -> str:
        """Base name of the mapped file, as patches name their module."""
        return os.path.basename(self.file_path)

    @property
    def map_files_entry(self) -> str:
        return f"{self.start:x}-{self.end:x}"

    def contains(self, address: int) -> bool:
        return self.start <= address < self.end


def parse_maps(text: str) -> list[Mapping]:
    mappings = []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) < 5:
            continue
        start, end = fields[0].split("-")
        mappings.append(
            Mapping(
                start=int(start, 16),
                end=int(end, 16),
                perms=fields[1],
                offset=int(fields[2], 16),
                dev=fields[3],
                inode=int(fields[4]),
                path=fields[5] if len(fields) > 5 else "",
            )
        )
    return mappings


def read_maps(pid: int) -> list[Mapping]:
    return parse_maps(read_proc_text(pid, "maps"))


def mapping_at(mappings: list[Mapping], address: int) -> Mapping | None:
    for mapping in mappings:
        if mapping.contains(address):
            return mapping
    return None


def pids_whose_maps(test: Callable[[list[Mapping]], bool]) -> list[int]:
    """Every other process whose mappings pass `test`; one that is gone, or not ours
    to read, is left out."""
    found = []
    for pid in all_pids():
        try:
            if test(read_maps(pid)):
                found.append(pid)
        except MicropatchError:
            continue
    return found


def pids_mentioning(name: str) -> list[int]:
    """Every other process whose maps mention `name` (a cave's, a page's memfd):
    the text searched, not parsed, since most processes have none."""
    return [pid for pid in all_pids() if _mentions(pid, name)]


def _mentions(pid: int, name: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return name in f.read()
    except OSError:
        return False
