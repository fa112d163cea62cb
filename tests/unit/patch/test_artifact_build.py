"""Artifacts built against module files: the canonical form and id, what a build
records, and what it refuses."""

from __future__ import annotations

import hashlib
import json

import pytest

from micropatch.build.artifact import build
from micropatch.errors import (
    ArtifactError,
    BranchIntoSite,
    MicropatchError,
    ModuleMismatch,
    NotInstructionBoundary,
    OriginalBytesMismatch,
    PatchFormatError,
    SymbolNotFound,
)
from micropatch.trust.artifact import Artifact, canonical_json, loads, patch_of

from .artifacts import FIX, NOW, identity_of, source, write_source

# --- canonical form and id -------------------------------------------------------


def test_canonical_json() -> None:
    assert canonical_json({"b": [1, {"d": None, "c": True}], "a": "é\n"}) == (
        b'{"a":"\\u00e9\\n","b":[1,{"c":true,"d":null}]}'
    )
    assert canonical_json({"x": 1, "y": 2}) == canonical_json({"y": 2, "x": 1})
    for value in (1.5, {"a": float("nan")}, [float("inf")]):
        with pytest.raises(ArtifactError, match="no canonical JSON form"):
            canonical_json(value)


def test_id_is_the_hash_of_the_canonical_payload(built: Artifact) -> None:
    document = json.loads(built.to_bytes())
    assert built.id == hashlib.sha256(canonical_json(document["payload"])).hexdigest()
    assert document["id"] == built.id
    assert built.file_name == f"unit-fix-v1-{built.id[:12]}.mpatch"
    # The file's layout does not matter: the same payload, reformatted, is the same artifact.
    compact = json.dumps(document, separators=(",", ":"), sort_keys=False).encode()
    assert loads(compact).id == built.id


def test_build_records_the_verified_facts(built: Artifact, targets) -> None:
    payload = built.payload
    build_id, sha256 = identity_of(targets.vuln_pie)
    # Version 2: its site carries a precomputed trampoline (version 1 has none).
    assert payload.sites[0].trampoline is not None
    assert (payload.format, payload.format_version) == ("micropatch-artifact", 2)
    assert (payload.module.name, payload.module.build_id, payload.module.sha256) == (
        "vuln_pie",
        build_id,
        sha256,  # recorded although the source pins only the build-id
    )
    assert payload.module.pie
    [site] = payload.sites
    symbol = targets.symbol(targets.vuln_pie, "copy_packet")
    assert (site.patchlet, site.at, site.offset, site.length) == (
        0,
        "copy_packet",
        symbol.offset,
        8,
    )
    assert site.original_bytes == targets.code(targets.vuln_pie, "copy_packet", 8)
    assert site.resume is None and not site.skip_red_zone  # the entry has no live red zone
    assert payload.patch.source.startswith('[patch]\nid = "unit-fix"')
    assert payload.patch.model["patchlet"][0]["expect"] == site.original_bytes.hex(" ")
    assert payload.builder.built_at == "2030-01-01T00:00:00Z"


def test_expected_bytes_are_filled_in(built: Artifact) -> None:
    patch = patch_of(built)
    assert patch.patchlets[0].expect == built.payload.sites[0].original_bytes
    assert patch.target.build_id == built.payload.module.build_id


def test_expect_longer_than_the_site_is_checked_and_kept(targets, tmp_path) -> None:
    """`expect` up to `resume` (past the 8-byte site): every byte is checked at
    build, and the artifact keeps them all for apply, instead of being rejected
    by its own `patch_of` ("rebuild it")."""
    code = targets.code(targets.vuln_pie, "copy_packet", 12)
    fix = {"at": "copy_packet", "code": "", "resume": "copy_packet+12", "expect": code.hex(" ")}
    art = build(write_source(tmp_path, source(targets.vuln_pie, [fix])), targets.vuln_pie)
    assert art.payload.sites[0].length == 8
    assert patch_of(art).patchlets[0].expect == code
    assert patch_of(loads(art.to_bytes(), "fix.mpatch")).patchlets[0].expect == code
    wrong = code[:10] + bytes([code[10] ^ 0xFF]) + code[11:]
    bad = {**fix, "expect": wrong.hex(" ")}
    with pytest.raises(OriginalBytesMismatch, match=r"the module file has"):
        build(write_source(tmp_path, source(targets.vuln_pie, [bad])), targets.vuln_pie)


def test_red_zone_and_resume_are_recorded(targets, tmp_path) -> None:
    text = source(
        targets.redzone,
        [{"at": "rz_sum+0x7a", "code": "push rax\npop rax"}],
    )
    [site] = build(write_source(tmp_path, text), targets.redzone).payload.sites
    assert site.skip_red_zone
    text = source(targets.vuln_pie, [{"at": "copy_packet", "code": "", "resume": "copy_packet+8"}])
    [site] = build(write_source(tmp_path, text), targets.vuln_pie).payload.sites
    assert site.resume == targets.symbol(targets.vuln_pie, "copy_packet").offset + 8


def test_a_body_writing_only_the_functions_frame_runs_at_its_rsp(targets, tmp_path) -> None:
    """[rsp+N] with N >= 0 below the return address is the function's frame: no step
    over the red zone, so the body's [rsp+N] is the function's [rsp+N]."""
    code = "mov qword ptr [rsp+0x10], rax"  # fr_scale's limit (frame.c)
    text = source(targets.frame, [{"at": "fr_scale+0x1a", "code": code}])
    [site] = build(write_source(tmp_path, text), targets.frame).payload.sites
    assert not site.skip_red_zone


def test_non_pie_and_shared_objects(targets, tmp_path) -> None:
    for module in (targets.vuln_nopie, targets.libvuln):
        art = build(write_source(tmp_path, source(module, [FIX])), module)
        assert art.payload.module.pie == (module != targets.vuln_nopie)
        assert art.payload.sites[0].offset == targets.symbol(module, "copy_packet").offset


def test_reproducible_with_source_date_epoch(targets, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    path = write_source(tmp_path, source(targets.vuln_pie, [FIX]))
    first, second = build(path, targets.vuln_pie), build(path, targets.vuln_pie)
    assert first.id == second.id
    assert first.payload.builder.built_at == "2023-11-14T22:13:20Z"


# --- build errors: everything is checked against the file ---------------------------


def test_wrong_module_file(targets, tmp_path) -> None:
    path = write_source(tmp_path, source(targets.vuln_pie, [FIX]))
    with pytest.raises(ModuleMismatch) as info:
        build(path, targets.vuln_nopie)
    message = str(info.value)
    assert f"{targets.vuln_nopie} is not the build {path} was written for" in message
    assert "build-id" in message and "build against the exact module file" in message


def test_wrong_sha256(targets, tmp_path) -> None:
    text = source(targets.vuln_pie, [FIX], pin="sha256").replace(
        identity_of(targets.vuln_pie)[1], "0" * 64
    )
    with pytest.raises(ModuleMismatch, match=r"has sha256 [0-9a-f]{64} \(patch: 0{64}\)"):
        build(write_source(tmp_path, text), targets.vuln_pie)


@pytest.mark.parametrize(
    ("patchlet", "error", "message"),
    [
        ({"at": "copy_pakcet", "code": ""}, SymbolNotFound, "close names: copy_packet"),
        (
            {"at": "copy_packet", "code": "", "expect": "90 90"},
            OriginalBytesMismatch,
            "expected bytes 90 90",
        ),
        ({"at": "copy_packet+1", "code": ""}, NotInstructionBoundary, "is inside the instruction"),
        ({"at": "copy_packet", "code": "jmp {no_such_symbol}"}, SymbolNotFound, "no_such_symbol"),
    ],
)
def test_patchlet_problems_name_the_patchlet(targets, tmp_path, patchlet, error, message) -> None:
    path = write_source(tmp_path, source(targets.vuln_pie, [patchlet]))
    with pytest.raises(error, match=message) as info:
        build(path, targets.vuln_pie)
    assert "patch unit-fix, patchlet[0]" in str(info.value)


def test_build_errors_speak_in_module_offsets(targets, tmp_path) -> None:
    """Not the placeholder address the file is planned at (0x7f00...)."""
    start = targets.symbol(targets.vuln_pie, "copy_packet").offset
    path = write_source(tmp_path, source(targets.vuln_pie, [{"at": "copy_packet+1", "code": ""}]))
    with pytest.raises(NotInstructionBoundary) as info:
        build(path, targets.vuln_pie)
    message = str(info.value)
    assert f"site {start + 1:#x} is inside the instruction at {start:#x}" in message
    assert "0x7f" not in message


def test_module_named_through_a_symbolic_link(targets, tmp_path) -> None:
    """Like Debian's /usr/bin/redis-server -> redis-check-rdb: processes map the
    target's name, so a patch for the link's name would never match one."""
    from micropatch.errors import ModuleError

    link = tmp_path / "server-link"
    link.symlink_to(targets.vuln_pie)
    path = write_source(tmp_path, source(targets.vuln_pie, [FIX], name="server-link"))
    with pytest.raises(
        ModuleError,
        match=r"symbolic link to .*vuln_pie: processes that run it map vuln_pie.*module = \"vuln_pie\"",
    ):
        build(path, link)
    # Named for the file it links to: built, and recorded under that name.
    art = build(write_source(tmp_path, source(targets.vuln_pie, [FIX])), link)
    assert (art.payload.module.name, art.payload.module.file) == ("vuln_pie", "vuln_pie")


def test_branch_into_site(targets, tmp_path) -> None:
    from targets.harness import SITES

    bad = next(s for s in SITES if not s.valid and "branch" in s.note.lower())
    module = targets.path(bad.target)
    at = f"{bad.function}+{bad.offset:#x}"
    path = write_source(tmp_path, source(module, [{"at": at, "code": ""}]))
    with pytest.raises(BranchIntoSite):
        build(path, module)


def test_unreadable_inputs(targets, tmp_path) -> None:
    with pytest.raises(ArtifactError, match=r"missing\.toml: cannot read patch source"):
        build(tmp_path / "missing.toml", targets.vuln_pie)
    path = write_source(tmp_path, source(targets.vuln_pie, [FIX]))
    with pytest.raises(MicropatchError, match=r"cannot read module file .*nothing"):
        build(path, tmp_path / "nothing")
    with pytest.raises(PatchFormatError, match=r"fix\.toml: .*TOML"):
        build(write_source(tmp_path, "[patch"), targets.vuln_pie)


def test_an_artifact_without_precomputed_trampolines_is_version_1(targets, tmp_path) -> None:
    """No trampoline can be precomputed for a non-PIE module: the artifact is written as
    version 1, which micropatch from before precomputed trampolines still reads."""
    path = write_source(tmp_path, source(targets.vuln_nopie, [FIX]))
    payload = build(path, targets.vuln_nopie, now=NOW).payload
    assert [s.trampoline for s in payload.sites] == [None]
    assert payload.format_version == 1
