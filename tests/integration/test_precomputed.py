"""Trampolines precomputed at build (`build.precompute`, `live.placed`): placed from
the signed record, they are byte for byte the ones the assembler lays out, on every
documented site of the test targets; an artifact without them applies as before."""

from __future__ import annotations

import random

import pytest
from targets.harness import SITES

from micropatch import live
from micropatch.build.artifact import build
from micropatch.build.modulefile import elsewhere, open_module
from micropatch.build.plan import plan_recorded
from micropatch.build.precompute import templates
from micropatch.live.cave import read_caves
from micropatch.live.engine import _plan
from micropatch.live.mapped import ModuleCache, symbol_address
from micropatch.live.placed import TemplateSite
from micropatch.process.maps import read_maps
from micropatch.process.memory import Memory
from micropatch.trust.admission import admit

from .patching import assert_untouched, patch_source, without_templates

# Every valid site of a position-independent target (vuln_nopie loads at its own
# address: its trampolines are laid out at apply time).
PIE_SITES = [s for s in SITES if s.valid and s.target != "vuln_nopie"]
REFERENCES = (  # a body with a rel32 and a 64-bit address into the module, and the counter
    "lea rax, [rip + {{{f}}}]\nmov rax, {{{f}+{o:#x}}}\nlock inc qword ptr [rip + {{@blocked}}]"
)


def _bodies(site) -> list[dict[str, object]]:
    at = f"{site.function}+{site.offset:#x}"
    found: list[dict[str, object]] = [
        {"at": at, "code": "nop"},
        {"at": at, "code": REFERENCES.format(f=site.function, o=site.offset)},
    ]
    if site.offset == 0:
        found.append({"at": at, "when": "edi > 1000", "then": "return -1"})
    return found


def _places(rng: random.Random, base: int) -> list[tuple[int, int, int]]:
    """Where a cave near the module could put a trampoline and its counter."""
    places = []
    for _ in range(6):
        cave = base + rng.choice([-1, 1]) * rng.randrange(1 << 20, 1 << 30) & ~0xFFF
        places.append(
            (cave + 0x3000 + rng.randrange(0, 0x1000), cave + 8 * rng.randrange(512), base)
        )
    return places


@pytest.mark.parametrize("site", PIE_SITES, ids=lambda s: f"{s.target}-{s.function}+{s.offset:#x}")
def test_templates_are_what_the_assembler_lays_out(targets, tmp_path, site):
    """At random places of the cave, the module and the counter: the same bytes, the
    same body range and copies, and the same displaced instructions."""
    from micropatch.bodies.toolchain import Toolchain
    from micropatch.build.plan import plan_module
    from micropatch.patch.source import parse_patch

    module = open_module(targets.path(site.target))
    toolchain = Toolchain()
    rng = random.Random(f"{site}")
    for body in _bodies(site):
        source = patch_source(targets.path(site.target), [body])
        plan = plan_module(parse_patch(source.encode(), "fix.toml"), module, toolchain, elsewhere)
        [template] = templates(plan, module, toolchain)
        assert template is not None, body
        [placed] = plan.at(module, toolchain, elsewhere)
        assert template.site(placed.site.address, placed.site.original) == (
            placed.site.address,
            placed.site.original,
            placed.site.starts,
        )
        for address, counter, base in _places(rng, module.base):
            [full] = plan.at(_at(module, base), toolchain, elsewhere)
            assert template.place(address, counter, base) == full.trampoline(address, counter)


def _at(module, base):
    import dataclasses

    return dataclasses.replace(module, base=base)


APPLIED = [  # (target, patchlet, what a call shows patched)
    ("vuln_pie", {"at": "copy_packet", "when": "esi > 64", "then": "return -1"},
     ("call 65", "-1")),
    ("vuln_pie", {"at": "copy_packet+0x8", "code": "cmp esi, 64\njg {copy_packet+0xb6}\n"
                  "lock inc qword ptr [rip + {@blocked}]"}, ("call 65", "-1")),
]  # fmt: skip


@pytest.mark.parametrize("target, patchlet, shows", APPLIED)
def test_a_signed_artifact_applies_its_precomputed_trampolines(
    targets, start, tmp_path, target, patchlet, shows
):
    """Applied from the record (no assembler on the path), the cave holds exactly what
    the assembler lays out at the same places in the same process."""
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.path(target), [patchlet]))
    admitted = admit(
        build(source, targets.path(target)).to_bytes(), name="fix.mpatch", keys=None,
        allow_unsigned=True,
    )  # fmt: skip
    t = start(target)
    mappings = read_maps(t.pid)
    cache = ModuleCache()
    module, placed = _plan(t.pid, mappings, admitted, cache)
    assert all(isinstance(p, TemplateSite) for p in placed)
    assert "image" not in vars(module.file), "the module's ELF was parsed"
    live.apply(admitted, t.pid, modules=cache)
    assert t.cmd(shows[0]) == shows[1]

    recorded = plan_recorded(admitted.patch, admitted.patch.sites)
    full = recorded.at(module, admitted.toolchain, lambda loc: symbol_address(t.pid, mappings, loc))
    with Memory(t.pid, writable=False) as memory:
        [cave] = [
            c for c in read_caves(memory, read_maps(t.pid)) if c.registry.module_base == module.base
        ]
        [applied] = cave.registry.patches
        for site, planned in zip(applied.sites, full, strict=True):
            layout = planned.trampoline(site.trampoline, site.counter)
            assert memory.read(site.trampoline, site.trampoline_size) == layout.code
            assert (site.copies, site.body) == (list(layout.copies), list(layout.body))
            assert site.starts == list(planned.site.starts)
            assert site.jump == planned.arch.site_jump(planned.site, site.trampoline)

    live.remove(admitted.id, t.pid)
    assert_untouched(targets, target, t.pid, ["copy_packet"])


def test_an_artifact_built_before_templates_applies_through_the_assembler(targets, start, tmp_path):
    """Sites recorded without a trampoline: planned and assembled at apply, as before."""
    from micropatch.trust.keys import generate_key

    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [APPLIED[0][1]]))
    key = generate_key("old")
    old = without_templates(build(source, targets.vuln_pie)).signed(key)
    admitted = admit(old.to_bytes(), name="old.mpatch", keys=[key.public])
    t = start("vuln_pie")
    _, placed = _plan(t.pid, read_maps(t.pid), admitted, ModuleCache())
    assert not any(isinstance(p, TemplateSite) for p in placed)
    live.apply(admitted, t.pid)
    assert (t.cmd("call 65"), t.cmd("call 64")) == ("-1", "64")
    live.remove(admitted.id, t.pid)
    assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])
