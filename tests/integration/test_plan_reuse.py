"""One signed artifact applied to several processes through one ModuleCache: the
plan it records is made once and placed at each process's load address; the
module's symbol tables are never read. (An artifact with precomputed trampolines
needs no plan at all: tests/integration/test_precomputed.py.)"""

from __future__ import annotations

import pytest

from micropatch import live
from micropatch.build.artifact import build
from micropatch.live.mapped import ModuleCache
from micropatch.process.maps import read_maps
from micropatch.trust.admission import admit

from .patching import assert_untouched, patch_source, without_templates

GUARD = {"at": "copy_packet", "when": "esi > 64", "then": "return -1"}
FIX_INSIDE = {"at": "copy_packet+0x8", "code": "cmp esi, 64\njg {copy_packet+0xb6}"}


def test_one_plan_placed_in_every_process(targets, start, tmp_path):
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [GUARD]))
    artifact = without_templates(build(source, targets.vuln_pie))
    admitted = admit(artifact.to_bytes(), name="fix.mpatch", keys=None, allow_unsigned=True)
    processes = [start("vuln_pie") for _ in range(3)]
    bases = {
        next(m.start for m in read_maps(t.pid) if m.file_path == str(targets.vuln_pie.resolve()))
        for t in processes
    }
    assert len(bases) == 3, "ASLR placed the processes' modules at one address"

    cache = ModuleCache()
    for t in processes:
        assert live.apply(admitted, t.pid, modules=cache).action == "applied"
    for t in processes:
        assert (t.cmd("call 65"), t.cmd("call 64"), t.cmd("call -3")) == ("-1", "64", "-1")
    [file] = cache._entries.values()
    assert "_tables" not in vars(file.image), "a symbol table was read"
    assert list(cache._plans) == [artifact.id]
    assert "artifact" not in vars(admitted), "the whole payload was validated"

    for t in processes:
        live.remove(admitted.id, t.pid)
        assert t.cmd("call 65") == "-2"
        assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])


@pytest.mark.parametrize("precomputed", [True, False], ids=["precomputed", "assembled"])
def test_a_code_body_inside_a_function_from_the_recorded_plan(
    targets, start, tmp_path, precomputed
):
    """A jump to a module offset, placed (or assembled) at each process's own load
    address."""
    source = tmp_path / "fix.toml"
    source.write_text(patch_source(targets.vuln_pie, [FIX_INSIDE]))
    artifact = build(source, targets.vuln_pie)
    if not precomputed:
        artifact = without_templates(artifact)
    admitted = admit(artifact.to_bytes(), name="fix.mpatch", keys=None, allow_unsigned=True)
    cache = ModuleCache()
    processes = [start("vuln_pie") for _ in range(2)]
    for t in processes:
        live.apply(admitted, t.pid, modules=cache)
    for t in processes:
        assert (t.cmd("call 65"), t.cmd("call 64"), t.cmd("call 0")) == ("-1", "64", "0")
        live.remove(admitted.id, t.pid)
        assert_untouched(targets, "vuln_pie", t.pid, ["copy_packet"])
