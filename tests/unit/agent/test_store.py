"""agent/store.py: admission into the store, rejection, versions, policy state."""

from __future__ import annotations

import shutil

import pytest
from integration.patching import patch_source

from micropatch.agent.db import Database
from micropatch.agent.events import Event
from micropatch.agent.paths import AgentPaths
from micropatch.agent.policy import Exclusion
from micropatch.agent.store import ArtifactStore, PolicyState
from micropatch.build.artifact import build
from micropatch.errors import AgentError, Downgrade, NotAdmitted, SignatureError
from micropatch.trust.keys import generate_key, load_private_key, write_key_pair


def setup_key(paths: AgentPaths):
    """The private key the `setup` fixture's trusted dev.pub belongs to."""
    return load_private_key(paths.trust_dir.parent / "dev.key")


FIX = {"at": "copy_packet", "code": "cmp esi, 64\njle ok\nmov esi, -1\nok:"}


@pytest.fixture
def setup(tmp_path, targets):
    key = generate_key("dev", expires_days=30)
    (tmp_path / "trusted").mkdir()
    write_key_pair(key, tmp_path / "trusted" / "dev")
    shutil.move(tmp_path / "trusted" / "dev.key", tmp_path / "dev.key")
    paths = AgentPaths(tmp_path / "state", tmp_path / "agent.sock", tmp_path / "trusted")
    paths.create()
    events: list[Event] = []
    store = ArtifactStore(paths, events.append)

    def artifact(version: int = 1, signer=key) -> bytes:
        source = tmp_path / f"fix-{version}.toml"
        source.write_text(patch_source(targets.vuln_pie, [FIX], id="fix", version=version))
        return build(source, targets.vuln_pie).signed(signer).to_bytes()

    return store, events, artifact, paths


def test_add_admits_copies_and_replaces_older_versions(setup):
    store, events, artifact, paths = setup
    stored, replaced = store.add(artifact(1), "fix-1.mpatch")
    assert (stored.id, stored.version, replaced) == ("fix", 1, None)
    assert [p.name for p in paths.store.glob("*.mpatch")] == [stored.path.name]
    assert store.add(artifact(1), "again.mpatch") == (stored, None)  # the same: nothing
    v2, replaced = store.add(artifact(2), "fix-2.mpatch")
    assert replaced is not None and replaced.version == 1
    assert [p.name for p in paths.store.glob("*.mpatch")] == [v2.path.name]
    with pytest.raises(Downgrade, match="never goes back"):
        store.add(artifact(1), "fix-1.mpatch")
    assert not list(paths.store.glob(".*"))  # no temporary file left
    # A fresh store (a restarted agent) loads what is there.
    fresh = ArtifactStore(paths, events.append)
    assert fresh.sync() and fresh.patches()["fix"].version == 2
    assert not fresh.sync()  # nothing changed since


def test_bad_files_are_rejected_moved_aside_and_reported(setup, tmp_path):
    store, events, artifact, paths = setup
    (paths.store / "junk.mpatch").write_bytes(b"\x00\x01")
    stranger = generate_key("stranger")
    (paths.store / "foreign.mpatch").write_bytes(artifact(1, stranger))
    assert not store.sync()
    assert store.patches() == {}
    assert sorted(e.data["file"] for e in events if e.kind == "rejected") == [
        "foreign.mpatch", "junk.mpatch"
    ]  # fmt: skip
    assert sorted(p.name.rsplit(".", 1)[0] for p in paths.rejected.iterdir()) == [
        "foreign.mpatch", "junk.mpatch"
    ]  # fmt: skip
    with pytest.raises(SignatureError):
        store.add(artifact(1, stranger), "foreign.mpatch")


def test_no_keys_admits_nothing_and_a_revoked_key_fails_the_recheck(setup):
    store, events, artifact, paths = setup
    store.add(artifact(1), "fix-1.mpatch")
    assert store.recheck("fix").id == "fix"
    shutil.move(paths.trust_dir / "dev.pub", paths.state_dir / "dev.pub")  # key withdrawn
    with pytest.raises(NotAdmitted, match="no trusted keys"):
        store.recheck("fix")
    assert store.patches() == {} and [e.kind for e in events] == ["rejected"]
    with pytest.raises(NotAdmitted):
        store.add(artifact(1), "fix-1.mpatch")


def test_a_newer_file_dropped_in_the_store_wins(setup):
    store, _events, artifact, paths = setup
    store.add(artifact(1), "fix-1.mpatch")
    (paths.store / "fix-v2-dropped.mpatch").write_bytes(artifact(2))
    assert store.sync()
    assert store.patches()["fix"].version == 2
    assert [p.name for p in paths.store.glob("*.mpatch")] == ["fix-v2-dropped.mpatch"]


def test_policy_state(tmp_path):
    state = PolicyState(Database(tmp_path / "agent.db"))
    assert state.ensure("a", "disabled") == "disabled"
    assert state.ensure("a", "enabled") == "disabled"  # a default only applies once
    state.set_state("a", "enabled")
    assert state.auto_disable("a", "/bin/x", "3 crashes") and not state.auto_disable("a", "/bin/x")
    assert state.view().auto_disabled == {("a", "/bin/x")}
    state.set_state("a", "enabled")  # enabling lifts the auto-disables
    assert state.view().auto_disabled == frozenset()
    e = Exclusion("exe", "/opt/*", "a")
    assert state.exclude(e) and not state.exclude(e)
    assert state.exclude(Exclusion("user", "0"))
    assert state.view().exclusions == (e, Exclusion("user", "0"))
    assert state.unexclude(e) and not state.unexclude(e)
    state.pin(10, 111, "a", False)
    assert state.view().pins == {("a", 10): False}
    assert state.view(lambda pid: 222).pins == {}  # pid 10 is another process now
    state.count(10, 111, "a", 5)
    assert state.counted(10, 111, "a") == 5
    state.prune(lambda pid, start: False)
    assert state.counted(10, 111, "a") is None and state.view().pins == {}
    # Another connection (a restarted agent) reads the same state.
    again = PolicyState(Database(tmp_path / "agent.db"))
    assert again.state("a") == "enabled" and again.exclusions() == [Exclusion("user", "0")]


def test_another_artifact_of_a_stored_version_is_refused(setup, targets, tmp_path):
    store, _events, artifact, paths = setup
    store.add(artifact(1), "fix-1.mpatch")
    source = tmp_path / "other.toml"
    fix = {"at": "copy_packet", "code": "cmp esi, 63\njle ok\nmov esi, -1\nok:"}
    source.write_text(patch_source(targets.vuln_pie, [fix], id="fix", version=1))
    other = build(source, targets.vuln_pie)
    with pytest.raises(SignatureError):  # unsigned: never admitted
        store.add(other.to_bytes(), "unsigned.mpatch")
    signer = setup_key(paths)
    with pytest.raises(AgentError, match="give a new build a new version"):
        store.add(other.signed(signer).to_bytes(), "other.mpatch")


def test_cpython_artifacts_are_kept_beside_native_ones(setup, tmp_path):
    import sys

    from micropatch.runtimes.cpython.build import build as build_python

    store, events, _artifact, paths = setup
    (tmp_path / "parsers.py").write_text("def parse(line):\n    return line\n")
    import hashlib

    digest = hashlib.sha256((tmp_path / "parsers.py").read_bytes()).hexdigest()
    (tmp_path / "py.toml").write_text(
        '[patch]\nid = "py-fix"\nversion = 1\n\n[target]\nruntime = "cpython"\n'
        f'module = "parsers"\nsha256 = "{digest}"\n\n[[patchlet]]\nat = "parse"\n'
        'when = "len(line) > 9"\nthen = "return \'\'"\n'
    )
    built = build_python(tmp_path / "py.toml", tmp_path / "parsers.py", python=sys.executable)
    (paths.store / built.file_name).write_bytes(built.signed(setup_key(paths)).to_bytes())
    (paths.store / "unsigned.mpatch").write_bytes(built.to_bytes())
    assert store.sync()
    assert store.patches() == {} and list(store.python_patches()) == ["py-fix"]
    assert store.recheck_python("py-fix").artifact.payload.module.name == "parsers"
    [rejected] = [e for e in events if e.kind == "rejected"]
    assert "unsigned.mpatch" in rejected.message  # never admitted, moved aside
    dropped = store.drop("py-fix", "revoked")
    assert dropped is not None and store.python_patches() == {}
    assert not (paths.store / built.file_name).exists()
