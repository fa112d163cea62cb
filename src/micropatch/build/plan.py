"""Turn a patch into concrete sites in one module, before any process is touched.

Everything that can fail without touching the process fails here: unknown
symbols, offsets inside instructions, branches into a site, bytes that do
not match, code that does not assemble.

A plan is made in module offsets (`ModulePlan`), the one coordinate system
every process that maps the same build shares; `ModulePlan.at` places it at
one mapping's load address. So a caller plans once per (module build, patch)
and reuses the plan in every process (`live.mapped.ModuleCache.plan`), and a
signed artifact, built for one exact build, carries its plan already: its
recorded sites need no symbol table, function bounds or disassembly
(`plan_recorded`).
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from micropatch import arch
from micropatch.arch import Architecture, Site, TrampolineLayout
from micropatch.elf.location import Location, parse_location
from micropatch.errors import (
    BranchIntoSite,
    MicropatchError,
    OriginalBytesMismatch,
    SiteError,
    UnresolvedReference,
)
from micropatch.patch.asmtext import BLOCKED_REFERENCE

if TYPE_CHECKING:
    from micropatch.bodies.frame import StackContext
    from micropatch.bodies.toolchain import Toolchain
    from micropatch.elf.identity import ModuleIdentity
    from micropatch.elf.image import ElfImage
    from micropatch.patch.view import PatchletView, PatchView
    from micropatch.trust.recorded import SiteFact

UNCHECKED_WINDOW = 64  # bytes decoded at a site whose function bounds are not checked


class ModuleView(Protocol):
    """A module's parsed file and the address its offset 0 is (or would be) loaded at:
    a module mapped in a process, or a file being built against."""

    @property
    def pid(self) -> int:
        """The process the module is mapped in; 0 for a file built against."""
        ...

    @property
    def name(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def base(self) -> int: ...
    @property
    def high(self) -> int: ...
    @property
    def identity(self) -> ModuleIdentity: ...
    @property
    def image(self) -> ElfImage: ...

    def address(self, offset: int) -> int: ...


@dataclass(frozen=True)
class PlannedSite:
    arch: Architecture
    index: int
    where: str  # "patchlet[0] (check_len+0x4) in vuln", for messages
    site: Site
    resume: int | None  # None: run the displaced instructions and return after the site
    body_at: Callable[[int, int], bytes]  # the body assembled at an address, with its counter
    skip_red_zone: bool
    needs_counter: bool  # the body records blocked events
    # The bytes checked at the site: its original bytes, or the patchlet's `expect`
    # where it covers more (up to `resume`, say). Compare all of them in a process.
    expect: bytes

    def body_for(self, counter: int) -> Callable[[int], bytes]:
        """The body by address alone, its blocked-event counter at `counter`."""
        return lambda at: self.body_at(at, counter)

    def trampoline(self, address: int, counter: int) -> TrampolineLayout:
        """The trampoline laid out at `address`, its blocked-event counter at `counter`."""
        return self.arch.build_trampoline(
            address,
            self.site,
            self.body_for(counter),
            resume=self.resume,
            skip_red_zone=self.skip_red_zone,
        )


ExternalResolver = Callable[[Location], int]
"""The address of another module's symbol (`libc.so.6!abort`) in the target process."""


def _no_external(location: Location) -> int:
    raise UnresolvedReference(
        f"{location} is in another module, which is only resolved in a running process"
    )


@dataclass(frozen=True)
class SitePlan:
    """One patchlet's site, planned in module offsets."""

    index: int
    patchlet: PatchletView
    offset: int  # module offset of the site
    original: bytes  # the whole instructions the jump overwrites
    resume: int | None  # module offset to continue at; None: after the site
    at_entry: bool  # the site is a function's first byte (no red zone live yet)
    skip_red_zone: bool
    needs_counter: bool
    expect: bytes  # bytes checked at the site in a process (see PlannedSite.expect)


@dataclass(frozen=True)
class ModulePlan:
    """A patch planned against one module build: the same for every mapping of it."""

    patch: PatchView
    arch: Architecture
    sites: tuple[SitePlan, ...]

    def at(
        self, module: ModuleView, toolchain: Toolchain, external: ExternalResolver = _no_external
    ) -> list[PlannedSite]:
        """The plan at `module`'s load address; bodies assemble through `toolchain`,
        references to other modules through `external` (this process's)."""
        return [_placed(self.arch, s, module, toolchain, external) for s in self.sites]


def plan_module(
    patch: PatchView,
    module: ModuleView,
    toolchain: Toolchain,
    external: ExternalResolver = _no_external,
) -> ModulePlan:
    """Every patchlet's site, checked, in module offsets.

    `toolchain` compiles the bodies (for a signed artifact: one holding the signed
    C code). `external` resolves references into other modules: in a process, from
    its maps; when building against a file, to a stand-in address.
    """
    machine = arch.get(patch.target.arch)
    try:
        return ModulePlan(patch, machine, _plan(machine, patch, module, toolchain, external))
    except MicropatchError as e:
        # The architecture speaks in addresses; authors write module offsets.
        e.args = (in_offsets(e.message, module), *e.args[1:])
        raise


def plan_patch(
    patch: PatchView,
    module: ModuleView,
    toolchain: Toolchain,
    external: ExternalResolver = _no_external,
) -> list[PlannedSite]:
    """Every patchlet's site, checked, and its body ready to assemble anywhere
    (`plan_module`, placed at `module`)."""
    return plan_module(patch, module, toolchain, external).at(module, toolchain, external)


def plan_recorded(patch: PatchView, recorded: Sequence[SiteFact]) -> ModulePlan:
    """The plan a signed artifact records: `build` planned and checked it against the
    very build the artifact names (site, length, original bytes, resume, red zone),
    so applying it needs none of the module's symbols. `patch` is the artifact's
    (`trust.recorded.recorded_patch`: its `expect` are the recorded bytes)."""
    sites = []
    for facts in sorted(recorded, key=lambda f: f.patchlet):
        patchlet = patch.patchlets[facts.patchlet]
        sites.append(
            SitePlan(
                facts.patchlet,
                patchlet,
                facts.offset,
                facts.original,
                facts.resume,
                # Guard and C bodies always push, so `build` skipped the red zone exactly
                # when not at a function's entry; a code body does not ask.
                not facts.skip_red_zone,
                facts.skip_red_zone,
                patchlet.counts_blocked,
                patchlet.expect or facts.original,
            )
        )
    return ModulePlan(patch, arch.get(patch.target.arch), tuple(sites))


_ADDRESS = re.compile(r"\b0x[0-9a-fA-F]+\b")


def in_offsets(message: str, module: ModuleView) -> str:
    """`message` with every address inside `module` written as a module offset,
    followed by the absolute address in parentheses when the module is mapped in
    a process (against a file, the address is a placeholder of no use)."""

    def offset(match: re.Match[str]) -> str:
        address = int(match.group(), 16)
        if not module.base <= address < module.high:
            return match.group()
        text = f"{address - module.base:#x}"
        return f"{text} ({address:#x})" if module.pid else text

    return _ADDRESS.sub(offset, message)


def _plan(
    machine: Architecture,
    patch: PatchView,
    module: ModuleView,
    toolchain: Toolchain,
    external: ExternalResolver,
) -> tuple[SitePlan, ...]:
    planned = [
        _plan_patchlet(machine, toolchain, patch, i, p, module, external)
        for i, p in enumerate(patch.patchlets)
    ]
    where = {p.index: f"patchlet[{p.index}] ({p.patchlet.at}) in {module.name}" for p in planned}
    for p in planned:
        for other in planned:
            end = other.offset + len(other.original)
            if p.resume is not None and other.offset < p.resume < end:
                raise SiteError(
                    f"patch {patch.id}, {where[p.index]}: resume target "
                    f"{module.address(p.resume):#x} is inside the site of {where[other.index]} "
                    f"({module.address(other.offset):#x}-{module.address(end):#x}), which the "
                    "jump overwrites"
                )
    cave = _stand_in_cave(machine, module)
    placed = [_placed(machine, p, module, toolchain, external) for p in planned]
    _refuse_references_into_sites(machine, patch, placed, cave)
    ordered = sorted(planned, key=lambda s: s.offset)
    for a, b in itertools.pairwise(ordered):
        if b.offset < a.offset + len(a.original):
            raise SiteError(
                f"patch {patch.id}: {where[a.index]} and {where[b.index]} overlap "
                f"({module.address(a.offset):#x}-{module.address(a.offset + len(a.original)):#x} "
                f"and {module.address(b.offset):#x}); one site per location"
            )
    return tuple(planned)


def _refuse_references_into_sites(
    machine: Architecture, patch: PatchView, planned: list[PlannedSite], at: int
) -> None:
    """A body's jump (or call, or address) into the middle of a site, its own or
    another patchlet's, would land in the bytes the jump overwrites."""
    for p in planned:
        for row in machine.listing(p.body_at(at, at), at):
            for target, other in itertools.product(row.references, planned):
                if not other.site.address < target < other.site.end:
                    continue
                raise BranchIntoSite(
                    f"patch {patch.id}, {p.where}: `{row.text}` (body+{row.address - at:#x}) "
                    f"refers to {target:#x}, inside the site of {other.where} "
                    f"({other.site.address:#x}-{other.site.end:#x}), which the jump "
                    "overwrites: go to the site's start, or past its end"
                )


def _stand_in_cave(machine: Architecture, module: ModuleView) -> int:
    """A page past the module's end: where a cave could be, in reach of it."""
    return (module.high + (1 << 20)) // machine.PAGE_SIZE * machine.PAGE_SIZE


def _stack_context(
    machine: Architecture, image: ElfImage, offset: int, at_entry: bool, skip_red_zone: bool
) -> StackContext:
    """Where the body runs, for `[frame+N]` and the stack rules: below the red zone
    or not, and where the return address is (from .eh_frame's CFA at the site)."""
    from micropatch.bodies.frame import StackContext

    step = machine.RED_ZONE if skip_red_zone else 0
    if at_entry:
        return StackContext(step, return_slot=0, cfa="rsp+0x8 (a function's entry)")
    cfa = image.cfa_at(offset)
    if cfa is None:
        return StackContext(step)
    slot = cfa.offset - 8  # the return address is pushed just below the CFA
    text = f"{cfa.register}{cfa.offset:+#x}"
    if cfa.register == "rsp":
        return StackContext(step, return_slot=slot, cfa=text)
    if cfa.register == "rbp":
        return StackContext(step, rbp_return_slot=slot, cfa=text)
    return StackContext(step)


def _plan_patchlet(
    machine: Architecture,
    toolchain: Toolchain,
    patch: PatchView,
    index: int,
    patchlet: PatchletView,
    module: ModuleView,
    external: ExternalResolver,
) -> SitePlan:
    where = f"patchlet[{index}] ({patchlet.at}) in {module.name}"
    try:
        image = module.image
        offset = image.resolve(patchlet.at)
        address = module.address(offset)
        at_entry = False
        if patchlet.check_branches:
            start, end = image.function_at(offset)
            site = machine.plan_site(image.read(start, end - start), module.address(start), address)
            at_entry = start == offset
        else:
            segment_end = max(
                (s.offset + s.filesz for s in image.segments if s.offset <= offset), default=0
            )
            window = max(0, min(UNCHECKED_WINDOW, segment_end - offset))
            site = machine.site_unchecked(image.read(offset, window), address)
        if patchlet.expect is not None:
            found = image.read(offset, len(patchlet.expect))
            if found != patchlet.expect:
                raise OriginalBytesMismatch(
                    f"expected bytes {patchlet.expect.hex(' ')}, the module file has "
                    f"{found.hex(' ')}: the patch was written for other code"
                )
        resume = None if patchlet.resume == "after" else image.resolve(patchlet.resume)
        counted = patchlet.counts_blocked
        # Checked at a stand-in trampoline (and counter) address past the module, as a
        # cave would be, never over the module's code it may jump to; the engine places
        # the real ones. A function's entry has no live red zone yet; elsewhere a leaf
        # may be using it.
        check_at = _stand_in_cave(machine, module)
        probe = _assemble(toolchain, patchlet, at_entry, module, external, check_at, check_at)
        skip_red_zone = not at_entry and machine.writes_stack(probe, check_at)
        stack = _stack_context(machine, image, offset, at_entry, skip_red_zone)
        # Every stack rule, where the body really runs.
        _assemble(toolchain, patchlet, at_entry, module, external, check_at, check_at, stack)
    except MicropatchError as e:
        e.within(f"patch {patch.id}, {where}: ", patch_id=patch.id, module=module.name)
        raise
    expect = site.original
    if patchlet.expect is not None and len(patchlet.expect) > site.length:
        expect = patchlet.expect
    return SitePlan(
        index, patchlet, offset, site.original, resume, at_entry, skip_red_zone, counted, expect
    )


def _assemble(
    toolchain: Toolchain,
    patchlet: PatchletView,
    at_entry: bool,
    module: ModuleView,
    external: ExternalResolver,
    at: int,
    counter: int,
    stack: StackContext | None = None,
) -> bytes:
    """The patchlet's body assembled at `at`, recording blocked events at `counter`
    (with `stack`: its `[frame+N]` rewritten and held to the stack rules)."""

    def resolve(reference: str) -> int:
        if reference == BLOCKED_REFERENCE:
            return counter
        location = parse_location(reference)
        if location.module is not None:
            return external(location)
        return module.address(module.image.resolve(reference))

    code = toolchain.body_source(
        patchlet, at_entry=at_entry, counter=counter if patchlet.counts_blocked else None
    )
    return toolchain.assemble(code, at, resolve, stack)


def _placed(
    machine: Architecture,
    s: SitePlan,
    module: ModuleView,
    toolchain: Toolchain,
    external: ExternalResolver,
) -> PlannedSite:
    """A site plan at the module's load address: its instructions decoded there.
    The stack rules were checked at build; placing needs only the body's step."""
    from micropatch.bodies.frame import StackContext

    stack = StackContext(machine.RED_ZONE if s.skip_red_zone else 0, located=False)

    @functools.lru_cache(maxsize=16)
    def body_at(at: int, counter: int) -> bytes:
        return _assemble(toolchain, s.patchlet, s.at_entry, module, external, at, counter, stack)

    return PlannedSite(
        machine,
        s.index,
        f"patchlet[{s.index}] ({s.patchlet.at}) in {module.name}",
        machine.site_unchecked(s.original, module.address(s.offset)),
        None if s.resume is None else module.address(s.resume),
        body_at,
        s.skip_red_zone,
        s.needs_counter,
        s.expect,
    )
