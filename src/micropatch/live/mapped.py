"""Find a patch's target module in a process and prove it is the right build.

The identity is read from the file the process really maps
(/proc/PID/map_files), never from a path: the file on disk may have been
upgraded since (maps says "(deleted)") or live in another mount namespace.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from micropatch.errors import ElfError, ModuleMismatch, ModuleNotLoaded, TracePermissionDenied
from micropatch.process.maps import Mapping
from micropatch.process.procfs import process_name

if TYPE_CHECKING:  # at run time only the functions that read a module load the ELF code
    from micropatch.build.plan import ExternalResolver, ModulePlan
    from micropatch.elf.identity import ModuleIdentity
    from micropatch.elf.image import ElfImage
    from micropatch.elf.location import Location
    from micropatch.patch.view import TargetView
    from micropatch.trust.admission import Admitted
    from micropatch.trust.recorded import ModuleFact

CAVE_PREFIX = "/memfd:micropatch"


class ModuleFile:
    """A module file as a process maps it, read once: its identity at once, its parsed
    ELF image (pyelftools) on first use. Applying an artifact whose trampolines are
    precomputed needs only the identity (`live.placed`); planning a source, or
    resolving another module's symbol, reads the image."""

    def __init__(self, data: bytes, name: str, identity: ModuleIdentity) -> None:
        self.data = data
        self.name = name
        self.identity = identity

    @cached_property
    def image(self) -> ElfImage:
        from micropatch.elf.image import ElfImage

        return ElfImage(self.data, self.name)


@dataclass(frozen=True)
class LoadedModule:
    pid: int
    path: str
    base: int  # address of the module's file offset 0: module offset 0
    mappings: tuple[Mapping, ...]
    file: ModuleFile

    @property
    def identity(self) -> ModuleIdentity:
        return self.file.identity

    @property
    def image(self) -> ElfImage:
        return self.file.image

    @property
    def name(self) -> str:
        return self.mappings[0].name

    @property
    def low(self) -> int:
        return min(m.start for m in self.mappings)

    @property
    def high(self) -> int:
        return max(m.end for m in self.mappings)

    def address(self, offset: int) -> int:
        return self.base + offset


class ModuleCache:
    """Identity and parsed ELF per file, so that `--all` or an agent hashes and
    parses each file once, and the plans of signed patches per module build, so
    that each is made once and placed in every process that maps the build.
    Owned by the caller, bounded: the least recently used entry (a file's entry
    holds the whole file) goes first."""

    def __init__(self, max_entries: int = 8, max_plans: int = 64) -> None:
        self.max_entries = max_entries
        self.max_plans = max_plans
        self._entries: OrderedDict[tuple[int, int, int, int], ModuleFile] = OrderedDict()
        self._plans: OrderedDict[str, ModulePlan] = OrderedDict()  # by artifact id

    def plan(
        self, admitted: Admitted, module: LoadedModule, external: ExternalResolver
    ) -> ModulePlan:
        """The plan of `admitted` against `module`'s build, in module offsets (place it
        with `ModulePlan.at(module, ...)`). A signed artifact's plan is the one it
        records (`build.plan.plan_recorded`: no symbol table is read), kept per artifact
        (it names its build); an unsigned source is planned against the module each
        time, with `external` resolving its references to other modules."""
        from micropatch.build.plan import plan_module, plan_recorded
        from micropatch.trust.recorded import RecordedPatch

        patch, envelope = admitted.patch, admitted.envelope
        if (
            not isinstance(patch, RecordedPatch)
            or patch.module is None
            or envelope is None
            or not built_for(patch.module, module.identity)
        ):
            # Recorded offsets hold for the build they were recorded on; `find_module`
            # refuses any other build first, and here it would be planned afresh.
            return plan_module(patch, module, admitted.toolchain, external)
        key = envelope.id  # its plan is in module offsets: the same for every mapping
        plan = self._plans.get(key)
        if plan is None:
            plan = plan_recorded(patch, patch.sites)
            self._plans[key] = plan
            while len(self._plans) > self.max_plans:
                self._plans.popitem(last=False)
        self._plans.move_to_end(key)
        return plan

    def get(self, file: BinaryIO) -> ModuleFile:
        with file:
            st = os.fstat(file.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            from micropatch.elf.identity import identify

            identity = identify(file)
            name = Path(file.name).name if isinstance(file.name, str) else "module"
            try:
                file.seek(0)
                data = file.read()
            except OSError as exc:
                raise ElfError(f"cannot read module file {name}: {exc.strerror}") from exc
            entry = ModuleFile(data, name, identity)
        self._entries[key] = entry
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry


def built_for(recorded: ModuleFact, identity: ModuleIdentity) -> bool:
    """`identity` is the build an artifact recorded: the same file, or the same
    build-id (the same link, stripped or not: code at the same offsets)."""
    if identity.sha256 == recorded.sha256.lower():
        return True
    return recorded.build_id is not None and identity.build_id == recorded.build_id.lower()


def module_groups(mappings: list[Mapping], name: str) -> list[list[Mapping]]:
    """The mappings of each distinct file named `name`, lowest address first."""
    groups: dict[tuple[str, int, str], list[Mapping]] = {}
    for m in mappings:
        if m.inode and m.name == name and not m.path.startswith(CAVE_PREFIX):
            groups.setdefault((m.dev, m.inode, m.file_path), []).append(m)
    return [sorted(g, key=lambda m: m.start) for g in groups.values()]


def _open_mapped_file(pid: int, first: Mapping) -> BinaryIO:
    try:
        return open(f"/proc/{pid}/map_files/{first.map_files_entry}", "rb")
    except PermissionError:
        pass  # map_files needs CAP_SYS_ADMIN; a path is fine if it is still the same file
    except FileNotFoundError:
        raise ModuleNotLoaded(f"process {pid} unmapped {first.file_path} meanwhile") from None
    if not first.deleted:
        try:
            file = open(f"/proc/{pid}/root{first.file_path}", "rb")  # noqa: SIM115
            if os.fstat(file.fileno()).st_ino == first.inode:
                return file
            file.close()
        except OSError:
            pass
    raise TracePermissionDenied(
        f"process {pid} maps {first.path}, which was replaced or deleted on disk since it was "
        "loaded; reading the mapped copy (/proc/PID/map_files) needs root (CAP_SYS_ADMIN)"
    )


def symbol_address(
    pid: int, mappings: list[Mapping], location: Location, cache: ModuleCache | None = None
) -> int:
    """Where another module's symbol (`libc.so.6!abort`) is in process pid."""
    assert location.module is not None
    groups = module_groups(mappings, location.module)
    if not groups:
        raise ModuleNotLoaded(
            f"reference {{{location}}}: process {pid} ({process_name(pid)}) does not map "
            f"{location.module}; nothing was changed"
        )
    first = groups[0][0]
    image = (cache or ModuleCache(1)).get(_open_mapped_file(pid, first)).image
    base = next((m.start for m in groups[0] if m.offset == 0), first.start)
    symbol = f"{location.symbol}+{location.addend:#x}" if location.addend else str(location.symbol)
    return base + image.resolve(symbol)


def find_module(
    pid: int, mappings: list[Mapping], target: TargetView, cache: ModuleCache | None = None
) -> LoadedModule:
    """The mapping of the patch's module in pid, checked against its identity."""
    cache = cache or ModuleCache(1)
    groups = module_groups(mappings, target.module)
    if not groups:
        import difflib

        names = sorted({m.name for m in mappings if m.inode})
        close = difflib.get_close_matches(target.module, names, n=3)
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ModuleNotLoaded(
            f"process {pid} ({process_name(pid)}) does not map {target.module}{hint}; "
            "nothing was changed"
        )
    mismatches = []
    for group in groups:
        file = _open_mapped_file(pid, group[0])
        module_file = cache.get(file)
        identity = module_file.identity
        problems = []
        if target.build_id and identity.build_id != target.build_id.lower():
            problems.append(f"build-id {identity.build_id or 'none'} (patch: {target.build_id})")
        if target.sha256 and identity.sha256 != target.sha256.lower():
            problems.append(f"sha256 {identity.sha256} (patch: {target.sha256})")
        if not problems:
            base = next((m.start for m in group if m.offset == 0), group[0].start)
            return LoadedModule(pid, group[0].file_path, base, tuple(group), module_file)
        mismatches.append(f"{group[0].path} has " + " and ".join(problems))
    raise ModuleMismatch(
        f"process {pid} ({process_name(pid)}) maps another build of {target.module}: "
        + "; ".join(mismatches)
        + "; this patch is for a different version of the module, nothing was changed"
    )
