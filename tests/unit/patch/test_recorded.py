"""trust.recorded and the admission of artifacts: the patch an artifact records is
read without pydantic, agrees with what the source parses to, and every
inconsistency or malformed field is refused with the artifact and field named."""

from __future__ import annotations

import copy
import datetime
import json
import re
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micropatch.errors import ArtifactError, MicropatchError, SignatureError
from micropatch.trust.admission import admit
from micropatch.trust.artifact import Artifact, patch_of
from micropatch.trust.keys import generate_key
from micropatch.trust.recorded import RecordedPatch

from .artifacts import NOW, document_of, leaf_paths, resealed, set_at

C_FIX = {"at": "copy_packet", "c": "mp_verdict patchlet(struct mp_regs *r) { return MP_CONTINUE; }"}
GUARD_FIX = {"at": "copy_packet", "when": "esi > 64", "then": "blocked; return -1"}


def _admit(data: bytes, **kw: Any):
    return admit(data, name="x.mpatch", keys=None, allow_unsigned=True, now=NOW, **kw)


def _fields(patch: Any) -> dict[str, Any]:
    """What the planner and engine read of a patch (patch.view)."""
    return {
        "info": (patch.info.id, patch.info.version, patch.info.title),
        "id": (patch.id, patch.version),
        "target": (patch.target.module, patch.target.build_id, patch.target.sha256,
                   patch.target.arch),
        "patchlets": [
            (p.at, p.expect, p.code, p.when, p.then, p.c, tuple(p.jumps), p.resume,
             p.check_branches, p.kind, p.counts_blocked)
            for p in patch.patchlets
        ],
    }  # fmt: skip


def test_the_recorded_patch_is_what_the_source_parses_to(built: Artifact) -> None:
    admitted = _admit(built.to_bytes())
    assert isinstance(admitted.patch, RecordedPatch)
    assert _fields(admitted.patch) == _fields(patch_of(built))
    assert admitted.patch.patchlets[0].expect  # filled from the site, as patch_of does
    # the whole payload is validated only when asked for, and it is the same artifact
    assert admitted.artifact is not None and admitted.artifact.id == built.id


@pytest.mark.parametrize("body", [GUARD_FIX, C_FIX])
def test_guard_and_c_bodies_too(targets, tmp_path, body) -> None:
    from micropatch.build.artifact import build

    from .artifacts import source, write_source

    made = build(write_source(tmp_path, source(targets.vuln_pie, [body])), targets.vuln_pie)
    admitted = _admit(made.to_bytes())
    assert _fields(admitted.patch) == _fields(patch_of(made))
    if "c" in body:  # the signed machine code, for the toolchain that runs no compiler
        assert admitted.toolchain.compile_c(body["c"]).text


def test_signatures_are_checked_before_the_payload_is_read(built: Artifact) -> None:
    key = generate_key("k", now=NOW)
    document = json.loads(built.signed(key, NOW).to_bytes())
    set_at(document, ("payload", "patch", "model", "patchlet"), "not a list")
    with pytest.raises(SignatureError, match="does not match the content"):
        admit(resealed(document), name="x.mpatch", keys=[key.public], now=NOW)


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (("payload", "patch", "version"), 2,
         "its recorded model is patch unit-fix v1, but it is labelled unit-fix v2"),
        (("payload", "module", "name"), "libc.so.6",
         "its source targets vuln_pie, but it was built for libc.so.6"),
        (("payload", "module", "build_id"), "abcd", "it was built against build-id abcd"),
        (("payload", "sites", 0, "patchlet"), 1, r"sites are recorded for patchlets \[1\]"),
        (("payload", "sites", 0, "at"), "copy_packet+8",
         "its site was recorded for 'copy_packet\\+8'"),
        (("payload", "patch", "model", "patchlet", 0, "expect"), "00 11",
         "patchlet\\[0\\] expects 00 11, but the site recorded holds"),
    ],
)  # fmt: skip
def test_inconsistent_artifacts(built: Artifact, path, value, problem) -> None:
    document = set_at(document_of(built), path, value)
    with pytest.raises(ArtifactError, match=problem) as info:
        _admit(resealed(document))
    assert str(info.value).startswith("x.mpatch: ") and "rebuild it" in str(info.value)


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        (
            ("payload", "patch", "model", "patchlet"),
            [],
            "payload.patch.model.patchlet: expected a non-empty list",
        ),
        (
            ("payload", "patch", "model", "patchlet", 0, "at"),
            7,
            r"patchlet\[0\]\.at: expected str, got 7",
        ),
        (
            ("payload", "patch", "model", "patchlet", 0, "check_branches"),
            1,
            "check_branches: expected bool",
        ),
        (
            ("payload", "patch", "model", "patch", "version"),
            True,
            r"patch\.version: expected int, got True",
        ),
        (
            ("payload", "patch", "model", "target"),
            None,
            "payload.patch.model.target: expected dict",
        ),
        (
            ("payload", "patch", "model", "patchlet", 0, "jumps"),
            [1],
            "jumps: expected a list of strings",
        ),
        (("payload", "sites", 0, "original"), "zz", r"sites\[0\]\.original: 'zz' is not hex bytes"),
        (("payload", "module", "sha256"), None, "module.sha256: expected str, got None"),
    ],
)
def test_malformed_records_name_the_field(built: Artifact, path, value, problem) -> None:
    document = set_at(document_of(built), path, value)
    with pytest.raises(ArtifactError, match=problem):
        _admit(resealed(document))


TRAMPOLINE = ("payload", "sites", 0, "trampoline")


@pytest.mark.parametrize(
    ("path", "value", "problem"),
    [
        ((*TRAMPOLINE, "code"), "zz", r"sites\[0\]\.trampoline\.code: 'zz' is not hex bytes"),
        ((*TRAMPOLINE, "fields"), [1], r"trampoline\.fields\[0\]: expected an object"),
        ((*TRAMPOLINE, "fields", 0, "width"), 5, r"fields\[0\]: not a field of this \d+-byte"),
        ((*TRAMPOLINE, "fields", 0, "offset"), 10**6, r"fields\[0\]: not a field of this"),
        ((*TRAMPOLINE, "starts"), [1], r"trampoline\.starts: \[1\] are not instructions of"),
        ((*TRAMPOLINE, "starts"), [0, 64], r"trampoline\.starts: \[0, 64\] are not"),
        ((*TRAMPOLINE, "copies"), [0], r"trampoline\.copies: \[0\] do not match the site"),
        ((*TRAMPOLINE, "body"), [0, 10**6], r"trampoline\.body: \[0, 1000000\] is not inside"),
        ((*TRAMPOLINE, "body"), [0], r"trampoline\.body: expected \[start, end\]"),
    ],
)  # fmt: skip
def test_a_malformed_precomputed_trampoline_is_refused(built: Artifact, path, value, problem):
    """What the engine relies on in a template (`build.precompute`) is checked when the
    artifact is read: a thread is moved by its starts and copies."""
    assert document_of(built)["payload"]["sites"][0]["trampoline"]["fields"]
    document = set_at(document_of(built), path, value)
    with pytest.raises(ArtifactError, match=problem) as info:
        _admit(resealed(document))
    assert str(info.value).startswith("x.mpatch: ")


def test_a_missing_optional_field_takes_the_models_default(built: Artifact) -> None:
    document = document_of(built)
    del document["payload"]["patch"]["model"]["patchlet"][0]["check_branches"]
    del document["payload"]["patch"]["model"]["target"]["arch"]
    patch = _admit(resealed(document)).patch
    assert patch.patchlets[0].check_branches is True and patch.target.arch == "x86_64"


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.data())
def test_mutated_records(built: Artifact, data: st.DataObject) -> None:
    """One field of a real artifact replaced by anything, the id recomputed: admission
    gets past the hash and must still fail cleanly, or admit a well-typed patch."""
    document = copy.deepcopy(document_of(built))
    path = data.draw(st.sampled_from(leaf_paths(document["payload"])))
    replacement = data.draw(
        st.none() | st.booleans() | st.integers() | st.text(max_size=30) | st.lists(st.integers())
    )
    set_at(document["payload"], path, replacement)
    try:
        encoded = resealed(document)
    except ArtifactError:
        return
    try:
        admitted = _admit(encoded)
        _fields(admitted.patch)  # every field readable (a guard that does not parse: its error)
    except MicropatchError:
        pass


def test_admitting_an_artifact_loads_no_model_framework(built: Artifact, tmp_path) -> None:
    key = generate_key("k", now=datetime.datetime.now(datetime.UTC))
    path = tmp_path / "a.mpatch"
    path.write_bytes(built.signed(key).to_bytes())
    code = (
        "import sys\n"
        "from micropatch.trust.keys import load_public_key\n"
        "from micropatch.trust.admission import admit\n"
        f"data = open({str(path)!r}, 'rb').read()\n"
        f"a = admit(data, name='a', keys=[load_public_key({str(tmp_path / 'k.pub')!r})])\n"
        "print(a.patch.patchlets[0].kind, a.described('a') is not None)\n"
        "print(sorted(m for m in ('pydantic', 'elftools', 'typer', 'rich') if m in sys.modules))\n"
    )
    from micropatch.trust.keys import write_key_pair

    write_key_pair(key, tmp_path / "k")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines() == ["code True", "[]"]


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("payload", "patch", "model", "patchlet", 0, "code"), "nop", "patchlet[0].code"),
        (("payload", "patch", "model", "patch", "title"), "other", "patch.title"),
        (("payload", "patch", "model", "patchlet", 0, "check_branches"), False,
         "patchlet[0].check_branches"),
    ],
)  # fmt: skip
def test_the_full_check_refuses_a_record_that_is_not_its_source(built, path, value, field):
    """verify, sign and the server (patch_of) hold the record apply reads to the source."""
    from micropatch.trust.artifact import loads

    data = resealed(set_at(document_of(built), path, value))
    with pytest.raises(ArtifactError, match=f"its recorded model says {re.escape(field)} = "):
        patch_of(loads(data, "x.mpatch"))
    _admit(data)  # apply reads only the record, which is consistent with the facts
