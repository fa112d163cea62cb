"""A patch placed at one mapping of its module: what the transaction writes.

`placed` gives each patchlet's site at the module's address and lays out its
trampoline wherever the transaction puts it. A signed artifact built for this
exact build carries each trampoline precomputed (`build.precompute`): the
site, its expected bytes and its trampoline are then filled in from the
record, with no planner, assembler, decoder or ELF parser loaded. Anything
else — an unsigned source, an artifact built before templates, a site without
one, another build of the module — is planned and assembled through
`build.plan`, as is any single trampoline whose place its template does not
cover (`TrampolineTemplate.place` returns None): same bytes, or same errors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from micropatch import arch
from micropatch.arch import Architecture, Site, TrampolineLayout

if TYPE_CHECKING:  # (a Protocol costs its definition at import, on every apply)
    from typing import Protocol

    from micropatch.arch.x86_64.template import TrampolineTemplate
    from micropatch.build.plan import ExternalResolver
    from micropatch.live.mapped import LoadedModule, ModuleCache
    from micropatch.trust.admission import Admitted

    class Placed(Protocol):
        """One patchlet's site at its address (`build.plan.PlannedSite`, `TemplateSite`)."""

        @property
        def arch(self) -> Architecture: ...
        @property
        def index(self) -> int: ...
        @property
        def where(self) -> str: ...
        @property
        def site(self) -> Site: ...
        @property
        def resume(self) -> int | None: ...
        @property
        def skip_red_zone(self) -> bool: ...
        @property
        def needs_counter(self) -> bool: ...
        @property
        def expect(self) -> bytes: ...

        def trampoline(self, address: int, counter: int) -> TrampolineLayout: ...


class TemplateSite:
    """A site whose trampoline the artifact carries precomputed. (A plain class: a
    frozen dataclass costs a millisecond to define, on the path of every apply.)"""

    def __init__(
        self,
        arch: Architecture,
        index: int,
        where: str,
        site: Site,
        resume: int | None,
        skip_red_zone: bool,
        needs_counter: bool,
        expect: bytes,
        template: TrampolineTemplate,
        base: int,  # the module's load address
        planned: Callable[[], list[Placed]],  # the plan made the long way, on demand
    ) -> None:
        self.arch, self.index, self.where, self.site = arch, index, where, site
        self.resume, self.skip_red_zone, self.needs_counter = resume, skip_red_zone, needs_counter
        self.expect, self.template, self.base, self.planned = expect, template, base, planned

    def trampoline(self, address: int, counter: int) -> TrampolineLayout:
        layout = self.template.place(address, counter, self.base)
        if layout is not None:
            return layout
        return self.planned()[self.index].trampoline(address, counter)


def placed(
    admitted: Admitted, module: LoadedModule, modules: ModuleCache, external: ExternalResolver
) -> list[Placed]:
    """Every patchlet of `admitted` placed at `module` (see the module doc)."""
    made: list[list[Placed]] = []

    def planned() -> list[Placed]:
        if not made:
            plan = modules.plan(admitted, module, external)
            made.append(list(plan.at(module, admitted.toolchain, external)))
        return made[0]

    from micropatch.live.mapped import built_for
    from micropatch.trust.recorded import RecordedPatch

    patch = admitted.patch
    if (
        not isinstance(patch, RecordedPatch)
        or patch.module is None
        or admitted.envelope is None
        or not built_for(patch.module, module.identity)
        or sorted(f.patchlet for f in patch.sites) != list(range(len(patch.patchlets)))
        or any(f.trampoline is None for f in patch.sites)
    ):
        return planned()
    machine = arch.get(patch.target.arch)
    sites: list[Placed] = []
    for facts in sorted(patch.sites, key=lambda f: f.patchlet):
        template = facts.trampoline
        assert template is not None
        patchlet = patch.patchlets[facts.patchlet]
        sites.append(
            TemplateSite(
                machine,
                facts.patchlet,
                f"patchlet[{facts.patchlet}] ({patchlet.at}) in {module.name}",
                template.site(module.address(facts.offset), facts.original),
                None if facts.resume is None else module.address(facts.resume),
                facts.skip_red_zone,
                template.counts,  # as `patchlet.counts_blocked`, without parsing the body
                patchlet.expect or facts.original,
                template,
                module.base,
                planned,
            )
        )
    return sites
