"""A signed artifact's recorded plan: the same sites and trampolines as planning
against the module, without reading its symbol tables; planned once per (build,
artifact) by `ModuleCache.plan`, and afresh for any other build."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from micropatch.build.artifact import build
from micropatch.build.modulefile import open_module
from micropatch.build.plan import plan_module, plan_recorded
from micropatch.elf.identity import ModuleIdentity
from micropatch.live.mapped import ModuleCache
from micropatch.trust.admission import Admitted, admit
from micropatch.trust.recorded import RecordedPatch

from .test_artifact import FIX, source, write_source

GUARD = {"at": "copy_packet", "when": "esi > 64", "then": "return -1"}
C_BODY = {
    "at": "copy_packet",
    "c": "mp_verdict patchlet(struct mp_regs *r)\n"
    "{\n"
    "    if ((int)r->rsi > 64)\n"
    "        return MP_RETURN(-1);\n"
    "    return MP_CONTINUE;\n"
    "}\n",
}
RESUMING = {"at": "copy_packet", "code": "", "resume": "copy_packet+8"}
INSIDE = {"at": "rz_sum+0x7a", "code": "push rax\npop rax"}


def _admitted(tmp_path: Path, module: Path, patchlet: dict[str, object]) -> Admitted:
    art = build(write_source(tmp_path, source(module, [patchlet])), module)
    return admit(art.to_bytes(), name="fix.mpatch", keys=None, allow_unsigned=True)


@pytest.mark.parametrize(
    ("module", "patchlet"),
    [
        ("vuln_pie", FIX),
        ("vuln_pie", GUARD),
        ("vuln_pie", C_BODY),
        ("vuln_pie", RESUMING),
        ("vuln_nopie", FIX),
        ("libvuln", GUARD),
        ("redzone", INSIDE),
    ],
)
def test_the_recorded_plan_is_the_planned_one(targets, tmp_path, module, patchlet) -> None:
    path = getattr(targets, module)
    admitted = _admitted(tmp_path, path, patchlet)
    assert isinstance(admitted.patch, RecordedPatch)
    file = open_module(path)
    planned = plan_module(admitted.patch, file, admitted.toolchain)
    recorded = plan_recorded(admitted.patch, admitted.patch.sites)
    [p], [r] = planned.sites, recorded.sites
    if admitted.patch.patchlets[0].kind == "code":  # a code body does not ask where it runs
        r = dataclasses.replace(r, at_entry=p.at_entry)
    assert r == p
    [p_site] = planned.at(file, admitted.toolchain)
    [r_site] = recorded.at(file, admitted.toolchain)
    assert (r_site.site, r_site.resume, r_site.expect) == (
        p_site.site,
        p_site.resume,
        p_site.expect,
    )
    at, counter = file.base + 0x10_0000, file.base + 0x10_0800
    assert r_site.trampoline(at, counter) == p_site.trampoline(at, counter)


def test_placing_a_recorded_plan_reads_no_symbol_table(targets, tmp_path) -> None:
    admitted = _admitted(tmp_path, targets.vuln_pie, FIX)
    file = open_module(targets.vuln_pie)
    cache = ModuleCache()
    plan = cache.plan(admitted, file, _unused)  # type: ignore[arg-type]  # a FileModule as loaded
    [site] = plan.at(file, admitted.toolchain)
    site.trampoline(file.base + 0x10_0000, file.base + 0x10_0800)
    assert "_tables" not in vars(file.image)  # the symbol tables were never parsed
    assert cache.plan(admitted, file, _unused) is plan  # type: ignore[arg-type]


def test_only_the_recorded_build_uses_the_recorded_plan(targets, tmp_path) -> None:
    """The same build-id (a stripped copy, say) is the same link: its recorded offsets
    hold. Any other build (which `find_module` refuses before) is planned afresh."""
    admitted = _admitted(tmp_path, targets.vuln_pie, FIX)
    file = open_module(targets.vuln_pie)
    cache = ModuleCache()
    recorded = cache.plan(admitted, file, _unused)  # type: ignore[arg-type]
    assert file.identity.build_id is not None
    stripped = dataclasses.replace(file, identity=ModuleIdentity(file.identity.build_id, "1" * 64))
    assert cache.plan(admitted, stripped, _unused) is recorded  # type: ignore[arg-type]
    assert "_tables" not in vars(file.image)
    other = dataclasses.replace(file, identity=ModuleIdentity("0" * 40, "1" * 64))
    fresh = cache.plan(admitted, other, _unused)  # type: ignore[arg-type]
    assert "_tables" in vars(other.image)  # planned against the file: its symbols were read
    assert fresh is not recorded and fresh.sites == recorded.sites


def _unused(location: object) -> int:
    raise AssertionError(f"{location} resolved")
