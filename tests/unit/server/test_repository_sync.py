"""`Repository.sync`: the targets made to list exactly what the server's database says,
re-signed only when they list anything else (so a restart that reconciles changes
nothing when nothing was cut short)."""

from __future__ import annotations

from pathlib import Path

import pytest

from micropatch.errors import RepositoryError
from micropatch.server.ceremony import init_repository
from micropatch.server.repository import Repository
from micropatch.trust.artifact import loads
from micropatch.trust.keys import PrivateKey

from .conftest import MakeArtifact


@pytest.fixture
def repo(tmp_path: Path, signing_key: PrivateKey) -> Repository:
    init_repository(tmp_path / "repo", offline_dir=tmp_path / "offline", root_keys=1,
                    root_threshold=1, targets_keys=[signing_key], online_targets=True)  # fmt: skip
    return Repository(tmp_path / "repo")


def versions(repo: Repository) -> tuple[int, int, int]:
    return (repo.targets().signed.version, repo.snapshot().signed.version,
            repo.timestamp().signed.version)  # fmt: skip


def test_sync_is_idempotent(repo: Repository, make_artifact: MakeArtifact) -> None:
    assert repo.sync({}) is False and versions(repo) == (1, 1, 1)
    a, b = make_artifact("sync-a", 1), make_artifact("sync-b", 1)
    name_a, name_b = loads(a).file_name, loads(b).file_name
    repo.store_target(name_a, a)
    repo.store_target(name_b, b)
    assert repo.target_files() == {}  # stored is not listed
    assert repo.sync({name_a: {"n": 1}, name_b: {"n": 2}}) is True
    assert versions(repo) == (2, 2, 2)
    listed = repo.target_files()
    assert sorted(listed) == sorted([name_a, name_b]) and listed[name_b].custom == {"n": 2}
    assert listed[name_a].length == len(a)
    assert repo.sync({name_a: {"n": 1}, name_b: {"n": 2}}) is False  # again: nothing
    assert versions(repo) == (2, 2, 2)
    assert repo.sync({name_a: {"n": 3}, name_b: {"n": 2}}) is True  # the facts changed
    assert repo.target_files()[name_a].custom == {"n": 3}
    assert repo.sync({name_b: {"n": 2}}) is True  # a removal
    assert list(repo.target_files()) == [name_b] and versions(repo) == (4, 4, 4)


def test_sync_needs_the_stored_file(repo: Repository, make_artifact: MakeArtifact) -> None:
    data = make_artifact("sync-c", 1)
    name = loads(data).file_name
    with pytest.raises(RepositoryError, match=r"its file is not in .*publish the artifact again"):
        repo.sync({name: {}})
    path = repo.store_target(name, data)
    path.write_bytes(data + b" ")  # damaged: its content no longer matches its name
    with pytest.raises(RepositoryError, match="its file is not in"):
        repo.sync({name: {}})
    assert versions(repo) == (1, 1, 1)  # nothing was signed
    with pytest.raises(RepositoryError, match="not a target name"):
        repo.store_target("../x", data)


def test_a_served_repository(repo: Repository) -> None:
    assert repo.served_by() is None
    repo.mark_served("sqlite:////srv/mp/server.db")
    assert Repository(repo.dir).served_by() == "sqlite:////srv/mp/server.db"
