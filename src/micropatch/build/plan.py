"""Turn a patch into concrete sites in one module, before any process is touched.

Everything that can fail without touching the process fails here: unknown
symbols, offsets inside instructions, branches into a site, bytes that do
not match, code that does not assemble.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from micropatch import arch
from micropatch.arch import Architecture, Site, TrampolineLayout
from micropatch.elf.location import Location, parse_location
from micropatch.errors import MicropatchError, OriginalBytesMismatch, SiteError, UnresolvedReference
from micropatch.patch.asmtext import BLOCKED_REFERENCE

if TYPE_CHECKING:
    from micropatch.bodies.toolchain import Toolchain
    from micropatch.elf.identity import ModuleIdentity
    from micropatch.elf.image import ElfImage
    from micropatch.patch.view import PatchletView, PatchView

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


def plan_patch(
    patch: PatchView,
    module: ModuleView,
    toolchain: Toolchain,
    external: ExternalResolver = _no_external,
) -> list[PlannedSite]:
    """Every patchlet's site, checked, and its body ready to assemble anywhere.

    `toolchain` compiles the bodies (for a signed artifact: one holding the signed
    C code). `external` resolves references into other modules: in a process, from
    its maps; when building against a file, to a stand-in address.
    """
    machine = arch.get(patch.target.arch)
    try:
        return _plan(machine, patch, module, toolchain, external)
    except MicropatchError as e:
        # The architecture speaks in addresses; authors write module offsets.
        e.args = (in_offsets(e.message, module), *e.args[1:])
        raise


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
) -> list[PlannedSite]:
    planned = [
        _plan_patchlet(machine, toolchain, patch, i, p, module, external)
        for i, p in enumerate(patch.patchlets)
    ]
    for p in planned:
        for other in planned:
            if p.resume is not None and other.site.address < p.resume < other.site.end:
                raise SiteError(
                    f"patch {patch.id}, {p.where}: resume target {p.resume:#x} is inside the site "
                    f"of {other.where} ({other.site.address:#x}-{other.site.end:#x}), which the "
                    "jump overwrites"
                )
    ordered = sorted(planned, key=lambda s: s.site.address)
    for a, b in itertools.pairwise(ordered):
        if b.site.address < a.site.end:
            raise SiteError(
                f"patch {patch.id}: {a.where} and {b.where} overlap "
                f"({a.site.address:#x}-{a.site.end:#x} and {b.site.address:#x}); "
                "one site per location"
            )
    return planned


def _refuse_below_red_zone(machine: Architecture, body: bytes, address: int) -> None:
    """A code body run below the red zone must leave through its end, where rsp is
    restored, and must not name the stack by rsp, whose value it does not share
    with the function."""
    for text in machine.exits(body, address):
        raise SiteError(
            f"the body writes below rsp (push, call or a store under rsp), so the engine runs "
            f"it {machine.RED_ZONE} bytes below rsp to spare the red zone of a leaf function, "
            f"and `{text}` leaves it before rsp is restored; jump out only from a body that "
            "does not push or call, or patch at the function's entry, where no red zone is live"
        )
    for text in machine.stack_operands(body, address):
        raise SiteError(
            f"the body writes below rsp (push, call or a store under rsp), so the engine runs "
            f"it with rsp lowered by {machine.RED_ZONE} bytes to spare the red zone of a leaf "
            f"function: `{text}` would not address what it says in the function (its "
            f"[rsp+N] is the body's [rsp+N+{machine.RED_ZONE:#x}] at entry, and moves with "
            "every push); rsp-relative operands are refused in such a body. Read or write the "
            "function's stack from a body that does not push, call or store below rsp (it runs "
            "at the function's rsp), or patch at the function's entry"
        )


def _plan_patchlet(
    machine: Architecture,
    toolchain: Toolchain,
    patch: PatchView,
    index: int,
    patchlet: PatchletView,
    module: ModuleView,
    external: ExternalResolver,
) -> PlannedSite:
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
        resume = (
            None if patchlet.resume == "after" else module.address(image.resolve(patchlet.resume))
        )

        counted = patchlet.counts_blocked

        @functools.lru_cache(maxsize=16)
        def body_at(at: int, counter: int) -> bytes:
            """The body assembled at `at`, recording blocked events at `counter`."""

            def resolve(reference: str) -> int:
                if reference == BLOCKED_REFERENCE:
                    return counter
                location = parse_location(reference)
                if location.module is not None:
                    return external(location)
                return module.address(image.resolve(reference))

            code = toolchain.body_source(
                patchlet, at_entry=at_entry, counter=counter if counted else None
            )
            return toolchain.assemble(code, at, resolve)

        # Checked with a stand-in counter address near the site; the engine places the real one.
        body = body_at(address, address)
        # A function's entry has no live red zone yet; elsewhere a leaf may be using it.
        skip_red_zone = not at_entry and machine.writes_stack(body, address)
        # Guard and C bodies adjust their rsp operands and restore rsp before they jump out.
        if skip_red_zone and patchlet.kind == "code":
            _refuse_below_red_zone(machine, body, address)
    except MicropatchError as e:
        e.within(f"patch {patch.id}, {where}: ", patch_id=patch.id, module=module.name)
        raise
    expect = site.original
    if patchlet.expect is not None and len(patchlet.expect) > site.length:
        expect = patchlet.expect
    return PlannedSite(
        machine, index, where, site, resume, body_at, skip_red_zone, counted, expect
    )
