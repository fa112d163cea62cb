"""The TUF repository and its client: publishing, revocation, and the attacks a client
must refuse (rollback, freeze, mix-and-match, arbitrary artifact, forged metadata)."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from micropatch.errors import RepositoryError, SignatureError, UpdateError
from micropatch.server.ceremony import init_repository, sign_root
from micropatch.server.expiry import root_expiry_warning
from micropatch.server.repository import Repository
from micropatch.server.updater import PatchUpdater
from micropatch.trust.artifact import loads
from micropatch.trust.keys import PrivateKey, generate_key, load_private_key, utc_now

from .conftest import MakeArtifact


def custom_of(data: bytes) -> dict[str, object]:
    artifact = loads(data)
    module = artifact.payload.module
    return {
        "micropatch": {
            "patch_id": artifact.payload.patch.id,
            "version": artifact.payload.patch.version,
            "artifact_id": artifact.id,
            "module": {"name": module.name, "build_id": module.build_id, "sha256": module.sha256},
        }
    }


def publish(repo: Repository, data: bytes, key: PrivateKey, **kw: object) -> str:
    name = loads(data).file_name
    repo.add_target(name, data, custom=custom_of(data), keys=[key], **kw)  # type: ignore[arg-type]
    return name


@pytest.fixture
def repo(tmp_path: Path, signing_key: PrivateKey) -> Repository:
    ceremony = init_repository(
        tmp_path / "repo", offline_dir=tmp_path / "offline", targets_keys=[signing_key]
    )
    assert len(ceremony.root_keys) == 3
    return Repository(tmp_path / "repo")


def client(repo: Repository, url: str, tmp_path: Path, signing_key: PrivateKey) -> PatchUpdater:
    root = (repo.metadata_dir / "1.root.json").read_bytes()
    return PatchUpdater(url, tmp_path / "client", keys=[signing_key.public], root=root)


def test_publish_list_fetch_and_revoke(
    repo: Repository,
    make_artifact: MakeArtifact,
    signing_key: PrivateKey,
    served: Callable[[Path], str],
    tmp_path: Path,
) -> None:
    data = make_artifact("fix-a", 1)
    name = publish(repo, data, signing_key)
    updater = client(repo, served(repo.public), tmp_path, signing_key)
    updater.refresh()
    [target] = updater.targets()
    assert (target.name, target.patch_id, target.version) == (name, "fix-a", 1)
    assert target.module["name"] == "libcheck.so"
    admitted = updater.fetch(name)
    assert admitted.id == "fix-a" and admitted.verification is not None

    repo.remove_target(name, keys=[signing_key])
    updater.refresh()
    assert updater.targets() == []
    with pytest.raises(UpdateError, match="never published, or it was revoked"):
        updater.fetch(name)


def test_rollback_of_timestamp_and_snapshot_is_refused(
    repo: Repository,
    make_artifact: MakeArtifact,
    signing_key: PrivateKey,
    served: Callable[[Path], str],
    tmp_path: Path,
) -> None:
    old_timestamp = (repo.metadata_dir / "timestamp.json").read_bytes()
    publish(repo, make_artifact("fix-a", 1), signing_key)
    updater = client(repo, served(repo.public), tmp_path, signing_key)
    updater.refresh()  # the client now trusts timestamp v2
    new_timestamp = (repo.metadata_dir / "timestamp.json").read_bytes()

    (repo.metadata_dir / "timestamp.json").write_bytes(old_timestamp)  # a mirror replays v1
    with pytest.raises(UpdateError, match="rollback") as caught:
        updater.refresh()
    assert "timestamp" in str(caught.value)
    # A restarted client remembers what it trusted: its cache, not its memory.
    with pytest.raises(UpdateError, match="rollback"):
        client(repo, updater.url, tmp_path, signing_key).refresh()

    # A timestamp that names an older snapshot than the client has seen.
    (repo.metadata_dir / "timestamp.json").write_bytes(new_timestamp)
    ts = json.loads(new_timestamp)
    ts_key = load_private_key(repo.online_dir / "timestamp.key")
    from tuf.api.metadata import Metadata, MetaFile

    md = Metadata.from_bytes(new_timestamp)
    md.signed.version += 1
    md.signed.snapshot_meta = MetaFile(version=1)
    from micropatch.server.tufkeys import signer

    md.signatures.clear()
    md.sign(signer(ts_key))
    (repo.metadata_dir / "timestamp.json").write_bytes(md.to_bytes())
    assert ts["signed"]["version"] == 2
    with pytest.raises(UpdateError, match="rollback"):
        updater.refresh()


def test_freeze_expired_timestamp_is_refused(
    tmp_path: Path,
    signing_key: PrivateKey,
    served: Callable[[Path], str],
) -> None:
    # A mirror that stopped updating serves metadata whose timestamp has expired.
    three_days_ago = utc_now() - datetime.timedelta(days=3)
    init_repository(
        tmp_path / "repo",
        offline_dir=tmp_path / "offline",
        targets_keys=[signing_key],
        now=three_days_ago,
    )
    repo = Repository(tmp_path / "repo")
    updater = client(repo, served(repo.public), tmp_path, signing_key)
    with pytest.raises(UpdateError, match="freeze") as caught:
        updater.refresh()
    assert "expired" in str(caught.value)

    assert repo.refresh() == ["timestamp"]  # the online key signs again
    updater.refresh()
    assert updater.targets() == []


def test_mix_and_match_is_refused(
    repo: Repository,
    make_artifact: MakeArtifact,
    signing_key: PrivateKey,
    served: Callable[[Path], str],
    tmp_path: Path,
) -> None:
    publish(repo, make_artifact("fix-a", 1), signing_key)  # targets v2, snapshot v2
    publish(repo, make_artifact("fix-b", 1), signing_key)  # targets v3, snapshot v3
    meta = repo.metadata_dir
    url = served(repo.public)

    # Targets metadata of another version served where the snapshot names v3.
    good_targets = (meta / "3.targets.json").read_bytes()
    (meta / "3.targets.json").write_bytes((meta / "2.targets.json").read_bytes())
    with pytest.raises(UpdateError, match="mix-and-match"):
        client(repo, url, tmp_path / "a", signing_key).refresh()
    (meta / "3.targets.json").write_bytes(good_targets)

    # A snapshot other than the one the timestamp hashes.
    good_snapshot = (meta / "3.snapshot.json").read_bytes()
    (meta / "3.snapshot.json").write_bytes((meta / "2.snapshot.json").read_bytes())
    with pytest.raises(UpdateError, match="mix-and-match"):
        client(repo, url, tmp_path / "b", signing_key).refresh()
    (meta / "3.snapshot.json").write_bytes(good_snapshot)

    updater = client(repo, url, tmp_path / "c", signing_key)
    updater.refresh()
    assert [t.patch_id for t in updater.targets()] == ["fix-a", "fix-b"]


def test_arbitrary_artifact_is_refused(
    repo: Repository,
    make_artifact: MakeArtifact,
    signing_key: PrivateKey,
    served: Callable[[Path], str],
    tmp_path: Path,
) -> None:
    name = publish(repo, make_artifact("fix-a", 1), signing_key)
    [file] = list(repo.targets_dir.glob(f"*.{name}"))
    good = file.read_bytes()
    url = served(repo.public)
    # Another validly signed artifact, swapped in under the published name.
    file.write_bytes(make_artifact("fix-a", 2))
    with pytest.raises(UpdateError, match="tampered artifact"):
        client(repo, url, tmp_path / "a", signing_key).fetch(name)
    # The same length, one byte changed.
    file.write_bytes(good[:100] + bytes([good[100] ^ 1]) + good[101:])
    with pytest.raises(UpdateError, match="tampered artifact"):
        client(repo, url, tmp_path / "b", signing_key).fetch(name)
    file.write_bytes(good)
    assert client(repo, url, tmp_path / "c", signing_key).fetch(name).id == "fix-a"


def test_artifact_signed_by_an_untrusted_key_is_refused(
    repo: Repository,
    make_artifact: MakeArtifact,
    signing_key: PrivateKey,
    served: Callable[[Path], str],
    tmp_path: Path,
) -> None:
    # The repository signs the target, but the artifact itself is by a stranger.
    stranger = generate_key("stranger")
    name = publish(repo, make_artifact("fix-s", 1, key=stranger), signing_key)
    updater = client(repo, served(repo.public), tmp_path, signing_key)
    with pytest.raises(SignatureError, match="not trusted"):
        updater.fetch(name)


def test_forged_metadata_is_refused(
    repo: Repository, signing_key: PrivateKey, served: Callable[[Path], str], tmp_path: Path
) -> None:
    from tuf.api.metadata import Metadata

    from micropatch.server.tufkeys import signer

    path = repo.metadata_dir / "timestamp.json"
    md = Metadata.from_bytes(path.read_bytes())
    md.signed.version += 1
    md.signatures.clear()
    md.sign(signer(generate_key("attacker")))
    path.write_bytes(md.to_bytes())
    with pytest.raises(UpdateError, match="not signed by the threshold"):
        client(repo, served(repo.public), tmp_path, signing_key).refresh()


def test_no_root_no_client(tmp_path: Path, signing_key: PrivateKey) -> None:
    with pytest.raises(UpdateError, match="no trusted root"):
        PatchUpdater("http://127.0.0.1:1", tmp_path, keys=[signing_key.public])


def test_unreachable_repository(repo: Repository, signing_key: PrivateKey, tmp_path: Path) -> None:
    updater = client(repo, "http://127.0.0.1:9", tmp_path, signing_key)
    with pytest.raises(UpdateError, match="cannot download"):
        updater.refresh()


def test_targets_key_required(repo: Repository, make_artifact: MakeArtifact) -> None:
    data = make_artifact("fix-a", 1)
    with pytest.raises(RepositoryError, match=r"needs 1 signature\(s\), but 0"):
        repo.add_target("x.mpatch", data)  # no targets key online
    with pytest.raises(RepositoryError, match="is not a targets key"):
        repo.add_target("x.mpatch", data, keys=[generate_key("other")])


def test_init_checks(tmp_path: Path) -> None:
    with pytest.raises(RepositoryError, match="root threshold 3"):
        init_repository(tmp_path / "r", root_keys=2, root_threshold=3)
    with pytest.raises(RepositoryError, match="not a micropatch repository"):
        Repository(tmp_path / "nothing")
    ceremony = init_repository(tmp_path / "r", root_keys=1, root_threshold=1, online_targets=True)
    assert ceremony.offline_dir == tmp_path / "r" / "offline-keys"
    with pytest.raises(RepositoryError, match="already a repository"):
        init_repository(tmp_path / "r")
    repo = Repository(tmp_path / "r")
    assert len(repo.online_targets_keys()) == 1
    assert repo.refresh() == []  # everything fresh
    assert repo.refresh(force=True) == ["targets", "snapshot", "timestamp"]
    assert repo.targets().signed.version == 2
    later = utc_now() + datetime.timedelta(hours=20)  # timestamp (1 day) past half its life
    assert repo.refresh(later) == ["timestamp"]


def test_dedicated_online_targets_key(
    tmp_path: Path, signing_key: PrivateKey, make_artifact: MakeArtifact
) -> None:
    """Patch-signing keys offline: uploads are checked against them (--trust), the
    server signs targets with a key of its own."""
    init_repository(
        tmp_path / "r", root_keys=1, root_threshold=1, online_targets=True,
        trusted=[signing_key.public],
    )  # fmt: skip
    repo = Repository(tmp_path / "r")
    assert [k.keyid for k in repo.trusted_keys()] == [signing_key.public.keyid]
    [online] = repo.online_targets_keys()
    assert online.public.keyid != signing_key.public.keyid
    data = make_artifact("fix-a", 1)
    repo.add_target(loads(data).file_name, data, custom=custom_of(data))
    assert list(repo.target_files()) == [loads(data).file_name]


# --- renewing and rotating the root -------------------------------------------------


def offline_root_keys(tmp_path: Path) -> list[PrivateKey]:
    return [load_private_key(tmp_path / "offline" / f"root-{i}.key") for i in (1, 2, 3)]


def trusted_root(tmp_path: Path) -> dict[str, object]:
    root: dict[str, object] = json.loads((tmp_path / "client/metadata/root.json").read_bytes())
    return root["signed"]  # type: ignore[return-value]


def test_sign_root_renews_and_the_client_follows(
    repo: Repository, signing_key: PrivateKey, served: Callable[[Path], str], tmp_path: Path
) -> None:
    updater = client(repo, served(repo.public), tmp_path, signing_key)
    updater.refresh()
    assert trusted_root(tmp_path)["version"] == 1
    v1_expires = repo.root().signed.expires
    online_before = {
        p.name: p.read_bytes() for p in repo.metadata_dir.iterdir() if "root" not in p.name
    }

    later = utc_now() + datetime.timedelta(days=200)
    done = sign_root(repo, offline_root_keys(tmp_path)[1:], now=later)  # 2 of 3
    assert (done.version, done.new_keys, done.threshold) == (2, (), 2)
    assert done.expires == later + datetime.timedelta(days=365) > v1_expires
    assert (repo.metadata_dir / "root.json").read_bytes() == done.path.read_bytes()
    # The online roles' keys are unchanged: nothing else was re-signed.
    assert online_before == {
        p.name: p.read_bytes() for p in repo.metadata_dir.iterdir() if "root" not in p.name
    }

    updater.refresh()
    signed = trusted_root(tmp_path)
    assert signed["version"] == 2
    assert signed["expires"] == done.expires.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert updater.targets() == []


def test_sign_root_rotates_to_new_keys(
    repo: Repository, signing_key: PrivateKey, served: Callable[[Path], str], tmp_path: Path
) -> None:
    from tuf.api.metadata import Metadata

    from micropatch.server.tufkeys import signer

    old = offline_root_keys(tmp_path)
    updater = client(repo, served(repo.public), tmp_path, signing_key)
    updater.refresh()
    # A lost key is named by its .pub, the others by (a prefix of) their key ids.
    remove = [str(tmp_path / "offline/root-1.pub"), old[1].public.keyid[:12],
              old[2].public.keyid]  # fmt: skip
    done = sign_root(
        repo,
        old[:2], new_root_keys=3, root_threshold=2, offline_dir=tmp_path / "new-offline",
        remove_root_keys=remove,
    )  # fmt: skip
    assert done.version == 2 and done.threshold == 2 and len(done.root_keyids) == 3
    assert [p.name for p in done.new_keys] == [f"root-v2-{i}.key" for i in (1, 2, 3)]
    assert (tmp_path / "new-offline").stat().st_mode & 0o777 == 0o700
    new = [load_private_key(p) for p in done.new_keys]
    updater.refresh()
    assert trusted_root(tmp_path)["version"] == 2

    # Version 3 signed by the old keys only: refused, before and after writing.
    with pytest.raises(RepositoryError, match=r"needs 2 signature\(s\) by root keys of version "
                       r"2 \(the keys clients trust now\), but 0 valid") as caught:  # fmt: skip
        sign_root(repo, old)
    assert "not root keys of version 2" in str(caught.value)
    assert not (repo.metadata_dir / "3.root.json").exists()
    forged = Metadata.from_bytes(done.path.read_bytes())
    forged.signed.version = 3
    forged.signatures.clear()
    for key in old:
        forged.sign(signer(key), append=True)
    (repo.metadata_dir / "3.root.json").write_bytes(forged.to_bytes())
    with pytest.raises(UpdateError, match="not signed by the threshold"):
        updater.refresh()
    assert trusted_root(tmp_path)["version"] == 2
    (repo.metadata_dir / "3.root.json").unlink()

    # The new keys sign the next version; one of them is not enough.
    with pytest.raises(RepositoryError, match=r"needs 2 signature\(s\).*but 1 valid"):
        sign_root(repo, new[:1])
    assert sign_root(repo, new[1:]).version == 3
    updater.refresh()
    assert trusted_root(tmp_path)["version"] == 3


def test_sign_root_needs_a_threshold_of_the_current_keys(repo: Repository, tmp_path: Path) -> None:
    root_json = (repo.metadata_dir / "root.json").read_bytes()
    old = offline_root_keys(tmp_path)
    with pytest.raises(RepositoryError, match=r"needs 2 signature\(s\) by root keys of version "
                       r"1 .*but 1 valid one\(s\) were given.*nothing was written") as caught:  # fmt: skip
        sign_root(repo, old[:1])
    assert all(key.public.keyid[:16] in str(caught.value) for key in old)  # as in the .pub
    # New keys count for the new root, not for the one clients trust now.
    with pytest.raises(RepositoryError, match=r"version 1 .*but 1 valid"):
        sign_root(repo, old[:1], new_root_keys=3, offline_dir=tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # Signed by the keys it removes: the old root agrees, the new one does not.
    with pytest.raises(RepositoryError, match=r"needs 1 signature\(s\) by its own root keys, "
                       r"but 0 valid"):  # fmt: skip
        sign_root(repo, old[:2], remove_root_keys=[old[0].public.keyid, old[1].public.keyid],
                       root_threshold=1)  # fmt: skip
    with pytest.raises(RepositoryError, match="inside the repository"):
        sign_root(repo, old, new_root_keys=1, offline_dir=repo.dir / "keys")
    with pytest.raises(RepositoryError, match="root threshold 4 must be between 1 and"):
        sign_root(repo, old, root_threshold=4)
    with pytest.raises(RepositoryError, match="no root key of version 1"):
        sign_root(repo, old, remove_root_keys=["0123456789abcdef"])
    assert not (repo.metadata_dir / "2.root.json").exists()
    assert (repo.metadata_dir / "root.json").read_bytes() == root_json


def test_refresh_warns_before_the_root_expires(
    repo: Repository, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert root_expiry_warning(repo) is None
    soon = utc_now() + datetime.timedelta(days=340)  # 25 days left of 365
    with caplog.at_level("WARNING", logger="micropatch.server.repository"):
        repo.refresh(soon)
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "expires in 25 day(s)" in record.getMessage()
    assert "micropatch repo sign-root" in record.getMessage()
    assert "expired" in (root_expiry_warning(repo, soon + datetime.timedelta(days=30)) or "")
    sign_root(repo, offline_root_keys(tmp_path)[:2], now=soon)
    assert root_expiry_warning(repo, soon) is None
    assert [(r, v) for r, v, _ in repo.roles()] == [
        ("root", 2), ("targets", 1), ("snapshot", 2), ("timestamp", 2)
    ]  # fmt: skip
