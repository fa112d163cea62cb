"""A module file seen as if loaded, for building and inspecting without a process.

A position-independent module is placed at PLACEHOLDER_BASE, a non-PIE
executable at its own image base, where it always loads; trampolines go at a
placeholder cave just above. A site's bytes and offsets do not depend on
either address.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from micropatch.arch.x86_64.constants import PAGE_SIZE
from micropatch.build.plan import ModuleView
from micropatch.elf.identity import ModuleIdentity, identify
from micropatch.elf.image import ElfImage
from micropatch.elf.location import Location
from micropatch.errors import ElfError, ModuleMismatch
from micropatch.patch.model import Patch

PLACEHOLDER_BASE = 0x7F00_0000_0000
_CAVE_GAP = 1 << 20


def open_module(path: str | Path) -> FileModule:
    """A module file as if loaded: at PLACEHOLDER_BASE if it is position-independent,
    else at its own image base. No process is involved; `pid` is 0. Symbolic links
    are resolved: `name` is the name processes map."""
    path = Path(path).resolve()  # a link's target: the file, and name, processes map
    try:
        with open(path, "rb") as f:
            identity = identify(f)
            image = ElfImage.from_file(f, path.name)
    except OSError as exc:
        raise ElfError(f"cannot read module file {path}: {exc.strerror}") from None
    return _file_module(path, identity, image)


@dataclass(frozen=True)
class FileModule:
    """A module file placed at an address, as the planner sees a loaded one."""

    path: str
    base: int
    identity: ModuleIdentity
    image: ElfImage

    @property
    def pid(self) -> int:
        return 0  # no process: addresses are placeholders

    @property
    def name(self) -> str:
        return Path(self.path).name

    @property
    def high(self) -> int:
        span = max(s.offset + s.memsz for s in self.image.segments)
        return self.base + (span + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE

    def address(self, offset: int) -> int:
        return self.base + offset


def _file_module(path: Path, identity: ModuleIdentity, image: ElfImage) -> FileModule:
    base = PLACEHOLDER_BASE if image.is_pie_or_shared else image.image_base
    return FileModule(str(path), base, identity, image)


ELSEWHERE = 0x7FFF_F000_0000
"""Stand-in for another module's symbol at build time: far from the module, as a
shared library usually is from an executable, so that code which could only reach
it with a rel32 (`call {libc.so.6!abort}`) fails here rather than in a process;
`mov rax, {libc.so.6!abort}` then `call rax` reaches anything."""


def elsewhere(location: Location) -> int:
    return ELSEWHERE + location.addend


def placeholder_cave(module: ModuleView) -> int:
    """A page-aligned address just above the module, in reach of every site."""
    return (module.high + _CAVE_GAP + PAGE_SIZE - 1) // PAGE_SIZE * PAGE_SIZE


def check_identity(patch: Patch, module: ModuleView, source: str) -> None:
    """ModuleMismatch unless the module file is the build the patch targets."""
    target, identity = patch.target, module.identity
    problems = []
    if target.build_id is not None and identity.build_id != target.build_id:
        problems.append(f"build-id {identity.build_id or 'none'} (patch: {target.build_id})")
    if target.sha256 is not None and identity.sha256 != target.sha256:
        problems.append(f"sha256 {identity.sha256} (patch: {target.sha256})")
    if problems:
        raise ModuleMismatch(
            f"{module.path} is not the build {source} was written for: it has "
            + " and ".join(problems)
            + "; build against the exact module file the patch targets"
        )
