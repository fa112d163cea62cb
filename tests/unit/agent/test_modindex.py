"""The module index (agent/modindex.py) on real files: copies found by identity,
whatever their name or directory, at the cost of one small read per file."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from micropatch.agent.modindex import ModuleIndex, WalkStats
from micropatch.elf.identity import identify
from micropatch.patch.model import Target

TRUE, FALSE = Path("/bin/true"), Path("/bin/false")


def target_of(path: Path, *, build_id: bool = True, sha256: bool = False) -> Target:
    with open(path, "rb") as f:
        identity = identify(f)
    if not identity.build_id:
        pytest.skip(f"{path} has no build-id")
    return Target(
        module=path.name,
        build_id=identity.build_id if build_id else None,
        sha256=identity.sha256 if sha256 or not build_id else None,
    )


def walked(index: ModuleIndex, root: Path, **kw) -> WalkStats:
    stats = WalkStats()
    assert index.walk(str(root), stats, **kw)
    return stats


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Copies of /bin/true under other names and directories, and other files."""
    (tmp_path / "site-packages/foo.libs").mkdir(parents=True)
    (tmp_path / "opt/app/.hidden").mkdir(parents=True)
    shutil.copy(TRUE, tmp_path / "site-packages/foo.libs/libtrue-1a2b3c4d.so.1")
    shutil.copy(TRUE, tmp_path / "opt/app/.hidden/true")
    os.link(tmp_path / "opt/app/.hidden/true", tmp_path / "opt/app/linked")
    os.symlink(tmp_path / "opt/app/linked", tmp_path / "opt/symlink")  # not followed
    shutil.copy(FALSE, tmp_path / "opt/app/false")  # another build
    (tmp_path / "opt/app/true").write_bytes(b"#!/bin/sh\n")  # the name, not the build
    for i in range(50):
        (tmp_path / "opt" / f"data-{i}.txt").write_text("x" * i)
    return tmp_path


def test_every_copy_of_a_build_is_found_whatever_its_name_or_directory(tree: Path) -> None:
    index = ModuleIndex()
    index.set_targets([target_of(TRUE)])
    stats = walked(index, tree)
    [copy_a, copy_b] = sorted(index.copies(), key=lambda c: min(c.paths))
    assert copy_a.paths == {str(tree / "opt/app/.hidden/true"), str(tree / "opt/app/linked")}
    assert copy_b.paths == {str(tree / "site-packages/foo.libs/libtrue-1a2b3c4d.so.1")}
    assert index.get(copy_a.file.inode) is copy_a
    assert index.paths_of(target_of(TRUE)) == sorted(copy_a.paths | copy_b.paths)
    # every regular file read once; only the candidates (a watched build-id) hashed
    assert stats.files == 55 and stats.modules == 4 and stats.hashed == 3
    assert stats.directories == 6 and stats.unreadable == 0


def test_a_sha256_pinned_by_the_target_must_agree_too(tree: Path) -> None:
    index = ModuleIndex()
    wrong = target_of(TRUE).model_copy(update={"sha256": "00" * 32})
    index.set_targets([wrong])
    assert walked(index, tree).hashed == 3 and index.copies() == []


def test_a_module_without_build_id_is_looked_for_under_its_name(tree: Path) -> None:
    index = ModuleIndex()
    index.set_targets([target_of(TRUE, build_id=False)])  # SHA-256 only: by name
    walked(index, tree)
    [copy] = index.copies()
    assert copy.paths == {str(tree / "opt/app/.hidden/true")}  # not the renamed ones


def test_a_walk_does_not_cross_into_other_mounts(tree: Path) -> None:
    index = ModuleIndex()
    index.set_targets([target_of(TRUE)])
    walked(index, tree, skip=frozenset({str(tree / "site-packages")}))
    assert [len(c.paths) for c in index.copies()] == [2]  # true and linked, in opt/


def test_events_add_and_take_copies_one_path_at_a_time(tree: Path) -> None:
    index = ModuleIndex()
    index.set_targets([target_of(TRUE)])
    walked(index, tree)
    new = tree / "venv/lib"
    new.mkdir(parents=True)
    shutil.copy(TRUE, new / ".tmp-123")
    os.rename(new / ".tmp-123", new / "libtrue.so")  # a package manager's write + rename
    fd = os.open(new, os.O_PATH)
    try:
        added, removed = index.examine(fd, "libtrue.so", str(new / "libtrue.so"))
        assert [c.paths for c in added] == [{str(new / "libtrue.so")}] and removed == []
        # upgraded: another build renamed over it
        shutil.copy(FALSE, new / ".tmp-456")
        os.rename(new / ".tmp-456", new / "libtrue.so")
        added, removed = index.examine(fd, "libtrue.so", str(new / "libtrue.so"))
        assert added == [] and [c.file.name for c in removed] == ["libtrue.so"]
    finally:
        os.close(fd)
    # a directory moved away: every copy under it goes
    gone = index.forget(str(tree / "opt/app"))
    assert {p for c in gone for p in c.paths} == set()  # both names were under it
    assert [c.file.name for c in index.copies()] == ["libtrue-1a2b3c4d.so.1"]


def test_after_a_complete_walk_what_it_did_not_see_is_forgotten(tree: Path) -> None:
    index = ModuleIndex()
    index.set_targets([target_of(TRUE)])
    walked(index, tree)
    (tree / "opt/app/linked").unlink()
    shutil.rmtree(tree / "site-packages")
    started = time.monotonic()
    walked(index, tree)
    gone = index.forget_unseen(started, [str(tree)])
    assert [c.file.name for c in gone] == ["libtrue-1a2b3c4d.so.1"]
    [left] = index.copies()
    assert left.paths == {str(tree / "opt/app/.hidden/true")}


def test_targets_gone_take_their_copies_a_new_build_asks_for_a_walk(tree: Path) -> None:
    index = ModuleIndex()
    assert index.set_targets([target_of(TRUE)]) == (True, [])
    walked(index, tree)
    assert index.set_targets([target_of(TRUE)])[0] is False  # nothing new to look for
    new, removed = index.set_targets([target_of(FALSE)])
    assert new is True and len(removed) == 2 and index.copies() == []
