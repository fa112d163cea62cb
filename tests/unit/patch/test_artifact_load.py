"""Artifacts loaded: round trip, tampering, signatures, malformed files and payloads,
inconsistent records, file errors."""

from __future__ import annotations

import datetime
import json

import pytest

from micropatch.errors import (
    ArtifactError,
    PatchFormatError,
    SignatureError,
)
from micropatch.trust import artifact, envelope
from micropatch.trust.admission import admit_file
from micropatch.trust.artifact import Artifact, loads, patch_of
from micropatch.trust.keys import generate_key

from .artifacts import DELETE, NOW, document_of, resealed, set_at

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


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (
            ("payload", "format_version"),
            3,
            r"version 3 is not supported .* reads versions 1 and 2\); it was built by a newer micropatch",
        ),
        (("payload", "format_version"), "1", "format_version: must be an integer"),
        (
            ("payload", "format_version"),
            1,
            r"trampolines \(sites\[\]\.trampoline\) need format_version 2",
        ),
        (("payload", "format"), "zip", "'zip' is not 'micropatch-artifact'"),
        (("payload", "module"), DELETE, r"payload\.module: required field is missing"),
        (
            ("payload", "sites", 0, "original"),
            DELETE,
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
    document = set_at(document_of(built), path, value)
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
    document = set_at(document_of(built), path, value)
    with pytest.raises(ArtifactError, match=problem) as info:
        patch_of(loads(resealed(document), "odd.mpatch"))
    assert str(info.value).startswith("odd.mpatch: ") and "rebuild it" in str(info.value)


def test_source_errors_name_the_artifact(built: Artifact) -> None:
    document = set_at(document_of(built), ("payload", "patch", "source"), "[patch")
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


def test_an_admitted_patch_says_what_was_verified(built: Artifact, targets) -> None:
    from micropatch.trust.admission import admit

    key = generate_key("release", now=NOW)
    signed = admit(built.signed(key, NOW).to_bytes(), name="fix.mpatch", keys=[key.public], now=NOW)
    assert (signed.id, signed.version) == ("unit-fix", 1)
    assert signed.described("fix.mpatch") == (
        f"verified fix.mpatch: unit-fix v1 for {targets.vuln_pie.name}, "
        f"signed by {key.public.describe()}"
    )
    unverified = admit(built.to_bytes(), name="fix.mpatch", keys=None, allow_unsigned=True)
    assert unverified.described("fix.mpatch") is None
