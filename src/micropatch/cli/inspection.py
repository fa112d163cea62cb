"""What `micropatch inspect` shows: each site of a patch, side by side: the original
instructions, the jump that replaces them, and the trampoline (labelled body,
displaced copy, jump back), against a module file or in a running process."""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection
from rich import box
from rich.table import Table
from rich.text import Text

from micropatch import live
from micropatch.arch import Architecture, TrampolineLayout
from micropatch.bodies.toolchain import Toolchain
from micropatch.build.modulefile import check_identity, open_module, placeholder_cave
from micropatch.build.plan import ModuleView, PlannedSite, plan_patch
from micropatch.cli.options import escape, fail, out, short, table_console
from micropatch.errors import MicropatchError
from micropatch.live.cave import read_caves
from micropatch.live.mapped import LoadedModule, find_module, symbol_address
from micropatch.live.registry import AppliedPatch
from micropatch.patch.model import Patch
from micropatch.patch.source import load_patch
from micropatch.process.maps import read_maps
from micropatch.process.memory import Memory
from micropatch.trust.admission import is_source
from micropatch.trust.artifact import Artifact, compiled_bodies, load, patch_of


class _Symbols:
    """Module offset -> `symbol+0xN`, from the module file's symbol tables."""

    def __init__(self, path: str | None, image_base: int) -> None:
        self._symbols: list[tuple[int, int, str]] = []
        if path is None:
            return
        try:
            with open(path, "rb") as f:
                elf = ELFFile(f)
                for section_name in (".symtab", ".dynsym"):
                    section = elf.get_section_by_name(section_name)
                    if not isinstance(section, SymbolTableSection):
                        continue
                    for sym in section.iter_symbols():
                        kind = sym["st_info"]["type"]
                        if (
                            sym.name
                            and kind in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE")
                            and sym["st_shndx"] not in ("SHN_UNDEF", "SHN_ABS")
                        ):
                            offset = sym["st_value"] - image_base
                            self._symbols.append((offset, sym["st_size"], sym.name))
                    if self._symbols:
                        break  # .symtab has everything .dynsym has
        except Exception:  # names are a nicety: a malformed table shows raw offsets
            self._symbols = []

    def name(self, offset: int) -> str | None:
        best: tuple[int, int, str] | None = None
        for start, size, name in self._symbols:
            inside = start <= offset < start + size or (size == 0 and start == offset)
            if inside and (best is None or size < best[1]):
                best = (start, size, name)
        if best is None:
            return None
        delta = offset - best[0]
        return f"{best[2]}+{delta:#x}" if delta else best[2]


@dataclass
class _SiteView:
    title: str
    original: list[str]
    replacement: list[str]
    trampoline: list[str]


def _listing(
    machine: Architecture,
    code: bytes,
    address: int,
    label: Callable[[int], str],
    annotate: Callable[[int], str | None],
) -> list[str]:
    rows = []
    for ins in machine.listing(code, address):
        notes = [n for n in (annotate(r) for r in ins.references) if n]
        comment = f"  ; {', '.join(notes)}" if notes else ""
        rows.append((label(ins.address), ins.raw.hex(), ins.text + comment))
    widths = [max((len(row[i]) for row in rows), default=0) for i in (0, 1)]
    return [f"{a:<{widths[0]}}  {b:<{widths[1]}}  {c}" for a, b, c in rows]


@dataclass
class _Context:
    machine: Architecture
    module: ModuleView
    symbols: _Symbols
    counters: tuple[int, int] = (0, 0)  # the cave's counter page(s), if known

    def where(self, address: int) -> str | None:
        offset = address - self.module.base
        span = self.module.high - self.module.base
        if not 0 <= offset < span:
            return None
        return self.symbols.name(offset) or f"{self.module.name}+{offset:#x}"

    def annotator(self, layout: TrampolineLayout, counter: int) -> Callable[[int], str | None]:
        def annotate(address: int) -> str | None:
            if counter and counter <= address < counter + 8:
                return "blocked-event counter (a writable data page, not code)"
            if self.counters[0] <= address < self.counters[1]:
                return "counter page (writable data, not code)"
            if layout.address <= address < layout.end:
                return f"trampoline+{address - layout.address:#x}"
            return self.where(address)

        return annotate

    def site_label(self, address: int) -> str:
        return self.where(address) or f"{address:#x}"


def _view(
    ctx: _Context,
    planned: PlannedSite,
    original: bytes,
    replacement: bytes,
    layout: TrampolineLayout,
    counter: int,
    title: str,
) -> _SiteView:
    site = planned.site
    annotate = ctx.annotator(layout, counter)
    machine = ctx.machine

    def part(address: int) -> str:
        return f"{layout.part(address):<9} +{address - layout.address:#05x}"

    return _SiteView(
        title,
        _listing(machine, original, site.address, ctx.site_label, annotate),
        _listing(machine, replacement, site.address, ctx.site_label, annotate),
        _listing(machine, layout.code, layout.address, part, annotate),
    )


def _planned_views(
    ctx: _Context,
    patch: Patch,
    planned: list[PlannedSite],
    cave: int,
    how: str,
    originals: dict[int, bytes] | None = None,
) -> list[_SiteView]:
    """Trampolines built at placeholder addresses: what would be written."""
    views = []
    at = cave
    counter = cave - 4096  # a stand-in counter page: the engine places the real one
    ctx.counters = (counter, counter + 4096)
    for p in planned:
        layout = p.trampoline(at, counter)
        original = (originals or {}).get(p.index, p.site.original)
        jump = p.arch.site_jump(p.site, at)
        views.append(_view(ctx, p, original, jump, layout, counter, _title(patch, p, how)))
        at += (layout.size + 15) // 16 * 16
    return views


def _title(patch: Patch, p: PlannedSite, how: str) -> str:
    resume = "after the site" if p.resume is None else f"at {p.resume:#x}"
    red_zone = "; steps over the red zone" if p.skip_red_zone else ""
    return (
        f"{patch.id} {p.where}: site {p.site.address:#x}, {p.site.length} bytes; resumes "
        f"{resume}{red_zone} [{how}]"
    )


def _load_any(path: Path) -> tuple[Patch, Toolchain, Artifact | None]:
    """Any patch file, unverified: inspect shows, it never applies."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as exc:
        raise MicropatchError(f"{path}: cannot read: {exc.strerror}") from exc
    if is_source(head, str(path)):
        return load_patch(path), Toolchain(), None
    built = load(path)
    # This toolchain holds the artifact's C code for this command only.
    return patch_of(built), Toolchain.signed(compiled_bodies(built)), built


def _print_header(patch: Patch, built: Artifact | None) -> None:
    out.print(
        escape(
            f"patch {patch.id} v{patch.version}"
            + (f": {patch.info.title}" if patch.info.title else "")
            + f" — module {patch.target.module}"
        ),
        highlight=False,
    )
    if built is None:
        out.print("  source, not an artifact: nothing is verified or signed", highlight=False)
        return
    p = built.payload
    out.print(f"  artifact {built.id}", highlight=False)
    out.print(
        escape(
            f"  built {p.builder.built_at} by micropatch {p.builder.version} against "
            f"{p.module.file} (build-id {p.module.build_id or 'none'}, sha256 {p.module.sha256})"
        ),
        highlight=False,
    )
    keyids = ", ".join(short(s.keyid) for s in built.signatures) or "none"
    out.print(
        f"  signatures by key {keyids} (not checked here: `micropatch verify`)", highlight=False
    )


def _print_facts(built: Artifact | None) -> None:
    if built is None:
        raise MicropatchError("a patch source has no recorded sites: give --module or --pid")
    from micropatch import arch

    machine = arch.get(patch_of(built).target.arch)
    for s in built.payload.sites:
        code = s.original_bytes
        listing = _listing(machine, code, s.offset, lambda a: f"{a:#x}", lambda _: None)
        out.print()
        out.print(
            Text(
                f"patchlet[{s.patchlet}] at {s.at}: module offset {s.offset:#x}, {s.length} "
                "bytes" + ("; steps over the red zone" if s.skip_red_zone else ""),
                style="bold",
            )
        )
        out.print(escape("\n".join(listing)), highlight=False)
    out.print("\n(give --module FILE or --pid PID to see the jumps and trampolines)")


def _file_views(patch: Patch, toolchain: Toolchain, module_file: Path) -> list[_SiteView]:
    from micropatch import arch

    module = open_module(module_file)
    check_identity(patch, module, str(module_file))
    planned = plan_patch(patch, module, toolchain)
    machine = arch.get(patch.target.arch)
    ctx = _Context(machine, module, _Symbols(str(module_file), module.image.image_base))
    cave = placeholder_cave(module)
    where = (
        f"module at placeholder {module.base:#x}"
        if module.image.is_pie_or_shared
        else f"module at its own address {module.base:#x}"
    )
    how = f"from {module_file}, {where}, trampoline at placeholder {cave:#x}"
    return _planned_views(ctx, patch, planned, cave, how)


def _mapped_file(module: LoadedModule) -> str | None:
    for candidate in (
        f"/proc/{module.pid}/map_files/{module.mappings[0].map_files_entry}",
        f"/proc/{module.pid}/root{module.path}",
    ):
        if os.access(candidate, os.R_OK):
            return candidate
    return None


def _process_views(patch: Patch, toolchain: Toolchain, pid: int) -> list[_SiteView]:
    from micropatch import arch

    mappings = read_maps(pid)
    module = find_module(pid, mappings, patch.target)
    planned = plan_patch(
        patch, module, toolchain, lambda location: symbol_address(pid, mappings, location)
    )
    machine = arch.get(patch.target.arch)
    ctx = _Context(machine, module, _Symbols(_mapped_file(module), module.image.image_base))
    states = [s for s in live.status(pid) if s.patch_id == patch.id]
    with Memory(pid, writable=False) as memory:
        caves = read_caves(memory, mappings)
        applied: AppliedPatch | None = next(
            (p for c in caves for p in c.registry.patches if p.id == patch.id), None
        )
        if applied is not None and applied.version == patch.version:
            state = states[0] if states else None
            since = (
                datetime.datetime.fromtimestamp(state.applied_at).strftime("%Y-%m-%d %H:%M:%S")
                if state
                else "?"
            )
            blocked = state.blocked if state else None
            out.print(
                f"[green]applied[/] to process {pid} since {since}, cave at "
                f"{state.cave if state else 0:#x}"
                + ("" if blocked is None else f"; blocked exploit attempts: {blocked}"),
                highlight=False,
            )
            views = []
            by_index = {s.patchlet: s for s in applied.sites}
            for p in planned:
                s = by_index.get(p.index)
                if s is None:
                    raise MicropatchError(
                        f"process {pid}: the registry has no site for {p.where}; "
                        "the applied patch differs from this artifact"
                    )
                current = memory.read(s.address, len(s.jump))
                layout = TrampolineLayout(
                    s.trampoline,
                    memory.read(s.trampoline, s.trampoline_size),
                    (s.body[0], s.body[1]) if len(s.body) == 2 else (s.trampoline, s.trampoline),
                    tuple(s.copies),
                    p.skip_red_zone,
                )
                how = "in the process" + ("" if current == s.jump else "; SITE MODIFIED since")
                title = _title(patch, p, how)
                views.append(_view(ctx, p, s.original, current, layout, s.counter, title))
            return views
        if applied is not None:
            out.print(
                f"[yellow]not applied[/] to process {pid}: version {applied.version} of "
                f"{patch.id} is applied there (this is v{patch.version})",
                highlight=False,
            )
        else:
            out.print(f"[yellow]not applied[/] to process {pid}", highlight=False)
        originals = {}
        for p in planned:
            found = originals[p.index] = memory.read(p.site.address, p.site.length)
            if found != p.site.original:
                out.print(
                    f"[red]![/] {escape(p.where)}: process {pid} holds {found.hex(' ')} at "
                    f"{p.site.address:#x}, the module file {p.site.original.hex(' ')}",
                    highlight=False,
                )
    cave = placeholder_cave(module)
    how = f"read from process {pid}; jump and trampoline would be written, at placeholder {cave:#x}"
    return _planned_views(ctx, patch, planned, cave, how, originals)


def show(artifact_file: Path, module: Path | None, pid: int | None) -> None:
    """Print the views `micropatch inspect` promises."""
    if module is not None and pid is not None:
        raise fail("give --module FILE or --pid PID, not both")
    try:
        patch, toolchain, built = _load_any(artifact_file)
        _print_header(patch, built)
        if module is not None:
            views = _file_views(patch, toolchain, module)
        elif pid is not None:
            views = _process_views(patch, toolchain, pid)
        else:
            _print_facts(built)
            return
    except MicropatchError as e:
        raise fail(str(e)) from None
    # Side by side needs room: when the output is not a terminal, do not squeeze it.
    console = table_console()
    for view in views:
        console.print()
        console.print(Text(view.title, style="bold"))
        table = Table("original instructions", "replaced by", "trampoline", box=box.SIMPLE_HEAD)
        columns = (view.original, view.replacement, view.trampoline)
        table.add_row(*(Text("\n".join(lines)) for lines in columns))
        console.print(table)
