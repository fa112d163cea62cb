"""Trampolines precomputed for the artifact, so that applying needs no assembler.

An artifact is built for one exact module build: each site's trampoline is laid
out here, with the assembler and the decoder, at places that differ in the
trampoline's address, its counter's and the module's, and recorded as a
template (`arch.x86_64.template`): code, and the fields those addresses fill
in. Applying places the template (`live.placed`) without loading keystone,
iced-x86 or pyelftools. A site whose trampoline is not a pure function of
those three addresses gets no template, and is laid out at apply time as
before: a body that refers to another module (its address is only known in a
process), a non-PIE module (its addresses fit 32 bits, where encodings
differ), or anything `derive` cannot prove.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from micropatch.arch import TrampolineLayout
from micropatch.arch.x86_64.template import TrampolineTemplate, derive
from micropatch.build.modulefile import PlacedModule
from micropatch.build.plan import ModulePlan
from micropatch.errors import MicropatchError

if TYPE_CHECKING:
    from micropatch.bodies.toolchain import Toolchain
    from micropatch.elf.location import Location


class _External(Exception):
    """The body refers to another module: its address is the process's."""


def _refuse(location: Location) -> int:
    raise _External(str(location))


def templates(
    plan: ModulePlan, module: PlacedModule, toolchain: Toolchain
) -> list[TrampolineTemplate | None]:
    """Each site's template, in the plan's order (None: laid out at apply time)."""
    if plan.arch.NAME != "x86_64" or not module.image.is_pie_or_shared:
        return [None] * len(plan.sites)
    found: list[TrampolineTemplate | None] = []
    for planned in plan.sites:
        one = ModulePlan(plan.patch, plan.arch, (planned,))

        def lay_out(
            address: int, counter: int, base: int, one: ModulePlan = one
        ) -> TrampolineLayout:
            placed = one.at(dataclasses.replace(module, base=base), toolchain, _refuse)[0]
            return placed.trampoline(address, counter)

        try:
            template = derive(lay_out)
            placed = one.at(module, toolchain, _refuse)[0]
        except (_External, MicropatchError):
            template = None
        if template is not None and template.counts != placed.needs_counter:
            template = None  # applying reads whether it counts from the template
        if template is not None:
            displaced = placed.site
            starts = tuple(s - displaced.address for s in displaced.starts)
            template = template._replace(starts=starts)
        found.append(template)
    return found
