"""Artifacts: build against module files, canonical form and id, loading, tampering,
and the loader's robustness against any input."""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micropatch.build.artifact import build
from micropatch.elf.identity import identify
from micropatch.errors import (
    ArtifactError,
    BranchIntoSite,
    MicropatchError,
    ModuleMismatch,
    NotInstructionBoundary,
    OriginalBytesMismatch,
    PatchFormatError,
    SignatureError,
    SymbolNotFound,
)
from micropatch.trust import artifact, envelope
from micropatch.trust.admission import admit_file
from micropatch.trust.artifact import Artifact, canonical_json, loads, patch_of
from micropatch.trust.keys import generate_key

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
FIX = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}


def _identity(module: Path) -> tuple[str, str]:
    with open(module, "rb") as f:
        identity = identify(f)
    assert identity.build_id
    return identity.build_id, identity.sha256


def source(
    module: Path,
    patchlets: list[dict[str, object]],
    *,
    pin: str = "build_id",
    version: int = 1,
    name: str | None = None,
) -> str:
    build_id, sha256 = _identity(module)
    lines = [
        "[patch]", 'id = "unit-fix"', f"version = {version}", 'title = "unit fix"', "",
        "[target]", f'module = "{name or module.name}"',
    ]  # fmt: skip
    if "build_id" in pin:
        lines.append(f'build_id = "{build_id}"')
    if "sha256" in pin:
        lines.append(f'sha256 = "{sha256}"')
    for p in patchlets:
        lines += ["", "[[patchlet]]", *(f"{k} = {json.dumps(v)}" for k, v in p.items())]
    return "\n".join(lines) + "\n"


def write_source(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "fix.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def built(targets, tmp_path_factory) -> Artifact:
    path = write_source(tmp_path_factory.mktemp("src"), source(targets.vuln_pie, [FIX]))
    return build(path, targets.vuln_pie, now=NOW)


def resealed(document: dict[str, Any]) -> bytes:
    """An artifact file whose id matches its (changed) payload: past the hash check."""
    document = {**document, "id": hashlib.sha256(canonical_json(document["payload"])).hexdigest()}
    return json.dumps(document).encode()


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
    build_id, sha256 = _identity(targets.vuln_pie)
    assert (payload.format, payload.format_version) == ("micropatch-artifact", 1)
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
        _identity(targets.vuln_pie)[1], "0" * 64
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


# --- loading, tampering, consistency -------------------------------------------------


def test_round_trip(built: Artifact, tmp_path) -> None:
    key = generate_key("k", now=NOW)
    signed = built.signed(key, NOW)
    assert signed.id == built.id  # signing does not change the content
    path = signed.write(tmp_path)
    assert path.name == built.file_name
    loaded = artifact.load(path)
    assert (loaded.id, loaded.payload, loaded.signatures) == (
        built.id,
        built.payload,
        signed.signatures,
    )
    assert artifact.verify(loaded, [key.public], NOW).signers == (key.public,)
    assert signed.signed(key, NOW).signatures == signed.signatures  # once per key


def test_tampered_payload(built: Artifact) -> None:
    signed = built.signed(generate_key("k", now=NOW), NOW)
    document = json.loads(signed.to_bytes())
    document["payload"]["sites"][0]["offset"] += 1
    with pytest.raises(
        ArtifactError, match=r"evil\.mpatch: the payload's SHA-256 is .* modified or corrupted"
    ):
        loads(json.dumps(document).encode(), "evil.mpatch")


def test_tampered_and_resealed_payload(built: Artifact) -> None:
    """Whoever recomputes the id still cannot make the signature match."""
    key = generate_key("k", now=NOW)
    document = json.loads(built.signed(key, NOW).to_bytes())
    document["payload"]["patch"]["source"] = document["payload"]["patch"]["source"].replace(
        "mov esi, -1", "mov esi, 1"
    )
    tampered = loads(resealed(document), "evil.mpatch")
    with pytest.raises(SignatureError, match=r"evil\.mpatch: .*modified after it was signed"):
        artifact.verify(tampered, [key.public], NOW)


def test_signature_by_untrusted_key(built: Artifact) -> None:
    signed = built.signed(generate_key("someone", now=NOW), NOW)
    with pytest.raises(SignatureError, match="which is not trusted"):
        artifact.verify(signed, [generate_key("me", now=NOW).public], NOW)


def test_expired_key(built: Artifact) -> None:
    key = generate_key("old", expires_days=1, now=NOW)
    signed = built.signed(key, NOW)
    with pytest.raises(SignatureError, match="which expired on 2030-01-02T00:00:00Z"):
        artifact.verify(signed, [key.public], NOW + datetime.timedelta(days=2))


def _document(built: Artifact) -> dict[str, Any]:
    return json.loads(built.to_bytes())  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("mangle", "problem"),
    [
        (lambda data: data[: len(data) // 2], r"invalid JSON at line .*truncated or corrupt\?"),
        (lambda data: data[:-3], r"invalid JSON at the end \(expecting"),
        (
            lambda data: data.replace(b'"length": 8', b'"length": 8.0'),
            "no canonical JSON form: float",
        ),
        (lambda data: b"", r"invalid JSON at the end"),
        (lambda data: b"\xff" + data, "not UTF-8"),
        (lambda data: b"[]", "expected a JSON object"),
        (lambda data: b'{"id": "x", "id": "y"}', "duplicate key 'id'"),
        (lambda data: b'{"payload": NaN}', "NaN is not JSON"),
        (lambda data: data.replace(b'"signatures"', b'"signaturez"'), "missing field 'signatures'"),
    ],
)
def test_malformed_files(built: Artifact, mangle, problem) -> None:
    with pytest.raises(ArtifactError, match=problem) as info:
        loads(mangle(built.to_bytes()), "bad.mpatch")
    assert str(info.value).startswith("bad.mpatch: ")


def _set(document: dict[str, Any], path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    node: Any = document
    for part in path[:-1]:
        node = node[part]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return document


_DELETE = object()


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (
            ("payload", "format_version"),
            2,
            r"version 2 is not supported .* reads version 1\); it was built by a newer micropatch",
        ),
        (("payload", "format_version"), "1", "format_version: must be an integer"),
        (("payload", "format"), "zip", "'zip' is not 'micropatch-artifact'"),
        (("payload", "module"), _DELETE, r"payload\.module: required field is missing"),
        (
            ("payload", "sites", 0, "original"),
            _DELETE,
            r"payload\.sites\[0\]\.original: required field",
        ),
        (("payload", "sites", 0, "original"), "xyz", "must be lowercase hex digits"),
        (("payload", "sites", 0, "length"), 2, "greater than or equal to 5"),
        (("payload", "sites", 0, "offset"), True, "valid integer"),
        (("payload", "sites"), [], "at least 1 item"),
        (("payload", "module", "sha256"), "ab", "must be 64 hex digits"),
        (("payload", "builder", "built_at"), "yesterday", r"payload\.builder\.built_at"),
        (("payload", "extra"), 1, r"payload\.extra: unknown field"),
        (("signatures",), {}, "signatures: must be a list"),
        (("signatures",), [{"keyid": "ab"}], r"signatures\[0\]: keyid must be 64"),
        (("more",), 1, "unknown top-level field 'more'"),
    ],
)
def test_malformed_payloads(built: Artifact, path, value, problem) -> None:
    document = _set(_document(built), path, value)
    with pytest.raises(ArtifactError, match=problem) as info:
        loads(resealed(document), "bad.mpatch")
    assert str(info.value).startswith("bad.mpatch: ")


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (
            ("payload", "patch", "version"),
            2,
            "its source is patch unit-fix v1, but it is labelled unit-fix v2",
        ),
        (
            ("payload", "module", "name"),
            "libc.so.6",
            "its source targets vuln_pie, but it was built for libc.so.6",
        ),
        (("payload", "module", "build_id"), "abcd", "it was built against build-id abcd"),
        (("payload", "sites", 0, "patchlet"), 1, r"sites are recorded for patchlets \[1\]"),
        (
            ("payload", "sites", 0, "at"),
            "copy_packet+8",
            "its site was recorded for 'copy_packet\\+8'",
        ),
    ],
)
def test_inconsistent_artifacts(built: Artifact, path, value, problem) -> None:
    document = _set(_document(built), path, value)
    with pytest.raises(ArtifactError, match=problem) as info:
        patch_of(loads(resealed(document), "odd.mpatch"))
    assert str(info.value).startswith("odd.mpatch: ") and "rebuild it" in str(info.value)


def test_source_errors_name_the_artifact(built: Artifact) -> None:
    document = _set(_document(built), ("payload", "patch", "source"), "[patch")
    with pytest.raises(PatchFormatError, match=r"^odd\.mpatch: fix\.toml: invalid TOML"):
        patch_of(loads(resealed(document), "odd.mpatch"))


def test_artifact_file_errors(tmp_path) -> None:
    with pytest.raises(ArtifactError, match=r"none\.mpatch: cannot read artifact"):
        artifact.load(tmp_path / "none.mpatch")
    huge = tmp_path / "huge.mpatch"
    with open(huge, "wb") as f:
        f.truncate(envelope.MAX_SIZE + 1)  # sparse: costs no disk
    with pytest.raises(
        ArtifactError, match=r"huge\.mpatch: cannot read artifact: larger than 64 MiB"
    ):
        artifact.load(huge)
    with pytest.raises(ArtifactError, match=r"/dev/zero: cannot read artifact: larger than 64 MiB"):
        admit_file("/dev/zero", keys=None, allow_unsigned=True)  # an endless file: bounded


def test_the_agent_client_bounds_artifacts_as_the_loader_does() -> None:
    """agent/client.py keeps its own copy of the bound (it must not load the trust layer)."""
    from micropatch.agent.client import MAX_ARTIFACT

    assert MAX_ARTIFACT == envelope.MAX_SIZE


# --- whatever the input, only MicropatchError escapes --------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=30,
)
_settings = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _load_and_use(data: bytes) -> None:
    try:
        loaded = loads(data, "fuzz.mpatch")
        patch_of(loaded)
        artifact.verify(loaded, [], NOW)
    except MicropatchError:
        pass


@_settings
@given(st.binary(max_size=400))
def test_random_bytes(data: bytes) -> None:
    _load_and_use(data)


@_settings
@given(_json)
def test_random_json(value: Any) -> None:
    _load_and_use(json.dumps(value).encode())


@_settings
@given(_json)
def test_random_payload_with_a_matching_id(value: Any) -> None:
    try:
        data = resealed({"payload": value, "signatures": []})
    except (ArtifactError, TypeError, ValueError):
        return  # no canonical form: the loader refuses those before hashing
    _load_and_use(data)


def _leaves(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _leaves(v, (*path, k))]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _leaves(v, (*path, i))]
    return [path]


@_settings
@given(data=st.data())
def test_mutated_artifacts(built: Artifact, data: st.DataObject) -> None:
    """One field of a real artifact replaced by anything, the id recomputed: the
    loader and the source check get past the hash and must still fail cleanly."""
    document = _document(built)
    leaves = _leaves(document["payload"])
    path = data.draw(st.sampled_from(leaves))
    replacement = data.draw(_json | st.text(max_size=200))
    _set(document["payload"], path, replacement)
    try:
        encoded = resealed(document)
    except ArtifactError:
        return
    _load_and_use(encoded)
