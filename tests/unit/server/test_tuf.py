"""The TUF repository and its client: publishing, revocation, and the attacks a client
must refuse (rollback, freeze, mix-and-match, arbitrary artifact, forged metadata)."""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from micropatch.errors import RepositoryError, SignatureError, UpdateError
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
    ceremony = Repository.init(
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
    from micropatch.server.repository import signer

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
    Repository.init(
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

    from micropatch.server.repository import signer

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
        Repository.init(tmp_path / "r", root_keys=2, root_threshold=3)
    with pytest.raises(RepositoryError, match="not a micropatch repository"):
        Repository(tmp_path / "nothing")
    ceremony = Repository.init(tmp_path / "r", root_keys=1, root_threshold=1, online_targets=True)
    assert ceremony.offline_dir == tmp_path / "r" / "offline-keys"
    with pytest.raises(RepositoryError, match="already a repository"):
        Repository.init(tmp_path / "r")
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
    Repository.init(
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
