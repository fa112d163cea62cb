"""The fleet server carries CPython patches like native ones: published (checked,
no compiler run), listed with their runtime, offered to a host whose inventory
holds the module's source (by its SHA-256), revoked; the console labels them."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from micropatch.trust.keys import PrivateKey

from .conftest import Api
from .test_console import PASSWORD, login

PARSERS = "def parse_header(line, limit=40):\n    return line.partition(':')[::2]\n"


@pytest.fixture
def python_artifact(tmp_path: Path, signing_key: PrivateKey) -> tuple[bytes, str]:
    """A signed CPython artifact for shop/parsers.py (built by this interpreter), and
    the SHA-256 of that source."""
    from micropatch.runtimes.cpython.build import build

    (tmp_path / "shop").mkdir()
    source_file = tmp_path / "shop" / "parsers.py"
    source_file.write_text(PARSERS)
    digest = hashlib.sha256(source_file.read_bytes()).hexdigest()
    toml = tmp_path / "fix.toml"
    toml.write_text(
        '[patch]\nid = "hdr-fix"\nversion = 1\ntitle = "parse_header: refuse long lines"\n\n'
        f'[target]\nruntime = "cpython"\nmodule = "shop.parsers"\nsha256 = "{digest}"\n\n'
        '[[patchlet]]\nat = "parse_header"\nwhen = "len(line) > limit"\n'
        "then = \"raise ValueError('too long')\"\n"
    )
    built = build(toml, source_file, python=sys.executable)
    return built.signed(signing_key).to_bytes(), digest


def test_publish_offer_and_revoke_a_cpython_patch(
    api: Api, python_artifact: tuple[bytes, str]
) -> None:
    from micropatch.server.fleet import users

    with api.server.database.session() as session:
        users.create_user(session, api.server.passwords, "auditor-web", "auditor", PASSWORD, "t")
    data, digest = python_artifact
    r = api.client.post("/api/v1/patches", content=data, headers=api.auth("operator"))
    assert r.status_code == 201, r.text
    published = r.json()
    assert published["runtime"] == "cpython"
    assert published["module"] == {"name": "shop.parsers", "build_id": None, "sha256": digest}
    target = api.server.repository.target_files()[published["target"]]
    assert target.custom["micropatch"]["runtime"] == "cpython"

    # A host whose interpreter imported that source is offered it; another is not.
    api.enroll("py-1")
    api.enroll("py-2")
    module = {"name": "shop.parsers", "path": "/srv/shop/parsers.py", "sha256": digest}
    r = api.client.post("/api/v1/checkin", json={"modules": [module]}, headers=api.auth("py-1"))
    assert r.status_code == 200, r.text
    [offered] = r.json()["patches"]
    assert (offered["patch_id"], offered["target"]) == ("hdr-fix", published["target"])
    assert offered["state"] == "enabled"
    other = {**module, "sha256": "0" * 64}  # another version of the file
    r2 = api.client.post("/api/v1/checkin", json={"modules": [other]}, headers=api.auth("py-2"))
    assert r2.json()["patches"] == []
    [listed] = api.client.get("/api/v1/patches", headers=api.auth("auditor")).json()
    assert (listed["runtime"], listed["hosts_relevant"]) == ("cpython", 1)

    # Compliance: the module is loaded and no process carries the patch, then one does.
    from micropatch.server.fleet import compliance

    def state() -> dict[int, dict[str, str]]:
        with api.server.database.session() as session:
            catalogue = api.server.catalogues.current(session)
            return compliance.host_states(catalogue, session, [py1])

    py1 = r.json()["host_id"]
    assert state() == {py1: {"hdr-fix": "vulnerable"}}
    carrying = {"pid": 7, "exe": "/usr/bin/python3.11",
                "patches": [{"patch_id": "hdr-fix", "version": 1, "state": "applied"}]}  # fmt: skip
    r = api.client.post("/api/v1/checkin", json={"modules": [module], "processes": [carrying]},
                        headers=api.auth("py-1"))  # fmt: skip
    assert r.status_code == 200, r.text
    assert state() == {py1: {"hdr-fix": "protected"}}

    page = login(api, "auditor").get("/console/patches")
    assert 'shop.parsers <span class="tag">CPython</span>' in page.text

    r = api.client.post("/api/v1/patches/hdr-fix/revoke", json={}, headers=api.auth("operator"))
    assert r.status_code == 200
    r = api.client.post("/api/v1/checkin", json={"modules": [module]}, headers=api.auth("py-1"))
    assert [x["patch_id"] for x in r.json()["revoked"]] == ["hdr-fix"]


def test_an_inconsistent_cpython_artifact_is_refused(
    api: Api, python_artifact: tuple[bytes, str], signing_key: PrivateKey
) -> None:
    from micropatch.trust.artifact import from_any_envelope, make_python
    from micropatch.trust.envelope import read_envelope

    data, _ = python_artifact
    artifact = from_any_envelope(read_envelope(data, "x"))
    payload = artifact.payload.model_copy(
        update={"module": artifact.payload.module.model_copy(update={"sha256": "1" * 64})}
    )
    forged = make_python(payload, "forged").signed(signing_key).to_bytes()  # type: ignore[arg-type]
    r = api.client.post("/api/v1/patches", content=forged, headers=api.auth("operator"))
    assert r.status_code == 422, r.text
    assert "inconsistent" in r.json()["detail"]
    assert api.client.get("/api/v1/patches", headers=api.auth("auditor")).json() == []
