"""Publish, revoke and a policy change with the server killed (SIGKILL, for real) at
every step between the database and the TUF repository (`micropatch.faults`
checkpoints, as tests/integration/test_crash.py does for the engine).

After each kill, restarted, the server's database and its repository say the same
thing, the old state or the new one (what the API lists, what a host's check-in
offers, what a TUF client that kept its cache all along sees), and the operation
done again completes it.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from unit.server.conftest import (  # noqa: F401 (fixtures)
    fresh_postgres,
    make_artifact,
    module,
    served,
    signing_key,
)

from micropatch import faults
from micropatch.server.updater import PatchUpdater
from micropatch.trust.keys import PrivateKey

from .test_server import data_dir, database, micropatch  # noqa: F401 (fixtures)
from .test_server_faults import Running, enroll

REPOSITORY_STEPS = ["repository-targets-written", "repository-snapshot-written",
                    "repository-timestamp-written"]  # fmt: skip
PUBLISH = (
    [("publish-stored", False)]
    + [(s, False) for s in REPOSITORY_STEPS]
    + [("publish-committed", True)]
)
REVOKE = [(s, False) for s in REPOSITORY_STEPS] + [("revoke-committed", True)]
POLICY = [("policy-written", False), ("policy-committed", True)]


class World:
    """A server, an operator, a host whose module the patch is for, and a TUF client
    (with its own cache, as an agent keeps it) reading the repository's files through a
    web server of their own (they are served while the API server is dead)."""

    def __init__(self, data: Path, tuf_url: str, key: PrivateKey, artifact: bytes) -> None:
        from unit.server.test_api import module_of

        self.server = Running(data)
        self.server.start()
        [self.credential] = enroll(self.server, 1)
        self.operator = micropatch("server", "admin", "create-user", "ops", "--role", "operator",
                                   "--data-dir", data).stdout.strip()  # fmt: skip
        self.artifact = artifact
        self.module = module_of(artifact)
        root = (data / "repository/public/metadata/1.root.json").read_bytes()
        self.tuf = PatchUpdater(tuf_url, data.parent / "agent-cache", keys=[key.public], root=root)

    def call(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.operator}"}
        return httpx.request(method, f"{self.server.url}{path}", headers=headers, timeout=60, **kw)

    def killed_during(self, method: str, path: str, **kw: Any) -> None:
        """The request is made; the server dies of SIGKILL at the fault point, unanswered."""
        with pytest.raises(httpx.TransportError):
            self.call(method, path, **kw)
        assert self.server.process is not None
        assert self.server.process.wait(timeout=60) == -signal.SIGKILL

    def restart(self, **env: str) -> None:
        if self.server.process is not None and self.server.process.poll() is None:
            self.server.stop(signal.SIGTERM)
        self.server.start(**env)

    def published(self) -> set[str]:
        """What the API, a host's check-in and a TUF client each say is published
        (unrevoked): they must agree."""
        api = {p["target"] for p in self.call("GET", "/api/v1/patches?revoked=false").json()}
        r = httpx.post(f"{self.server.url}/api/v1/checkin", timeout=60,
                       json={"modules": [self.module]},
                       headers={"Authorization": f"Bearer {self.credential}"})  # fmt: skip
        assert r.status_code == 200, r.text
        offered = {p["target"] for p in r.json()["patches"]}
        self.tuf.refresh()
        tuf = {t.name for t in self.tuf.targets()}
        assert api == offered == tuf, f"API {api}, check-in {offered}, TUF {tuf}"
        for name in tuf:  # and what is listed downloads, and is admitted
            assert self.tuf.fetch(name).id == "fix-c"
        return tuf

    def policy(self) -> str:
        r = httpx.post(f"{self.server.url}/api/v1/checkin", timeout=60,
                       json={"modules": [self.module]},
                       headers={"Authorization": f"Bearer {self.credential}"})  # fmt: skip
        [offered] = r.json()["patches"]
        return str(offered["state"])

    def close(self) -> None:
        if self.server.process is not None and self.server.process.poll() is None:
            self.server.process.kill()
            self.server.process.wait()


@pytest.fixture
def world(data_dir: Path, served, signing_key: PrivateKey, make_artifact) -> Any:  # noqa: F811
    w = World(data_dir, served(data_dir / "repository/public"), signing_key,
              make_artifact("fix-c", 1))  # fmt: skip
    yield w
    w.close()


def target_of(world: World) -> str:
    from micropatch.trust.artifact import loads

    return loads(world.artifact).file_name


@pytest.mark.parametrize(("point", "done"), PUBLISH, ids=[p for p, _ in PUBLISH])
def test_publish_killed(world: World, point: str, done: bool) -> None:
    assert world.published() == set()
    world.restart(**faults.environment(point))
    world.killed_during("POST", "/api/v1/patches", content=world.artifact)
    world.restart()  # reconciled before it answers
    assert world.published() == ({target_of(world)} if done else set())
    r = world.call("POST", "/api/v1/patches", content=world.artifact)
    assert r.status_code == (200 if done else 201), r.text
    assert world.published() == {target_of(world)}


@pytest.mark.parametrize(("point", "done"), REVOKE, ids=[p for p, _ in REVOKE])
def test_revoke_killed(world: World, point: str, done: bool) -> None:
    assert world.call("POST", "/api/v1/patches", content=world.artifact).status_code == 201
    assert world.published() == {target_of(world)}
    world.restart(**faults.environment(point))
    world.killed_during("POST", "/api/v1/patches/fix-c/revoke", json={})
    world.restart()
    assert world.published() == (set() if done else {target_of(world)})
    r = world.call("POST", "/api/v1/patches/fix-c/revoke", json={})
    assert r.status_code == (404 if done else 200), r.text
    assert world.published() == set()


@pytest.mark.parametrize(("point", "done"), POLICY, ids=[p for p, _ in POLICY])
def test_policy_change_killed(world: World, point: str, done: bool) -> None:
    assert world.call("POST", "/api/v1/patches", content=world.artifact).status_code == 201
    assert world.policy() == "enabled"
    world.restart(**faults.environment(point))
    change = {"default_state": "enabled", "patches": {"fix-c": "disabled"}}
    world.killed_during("PUT", "/api/v1/policies/", json=change)
    world.restart()
    assert world.policy() == ("disabled" if done else "enabled")
    assert world.call("PUT", "/api/v1/policies/", json=change).status_code == 200
    assert world.policy() == "disabled"
    assert world.published() == {target_of(world)}  # the repository never changed


def test_repo_commands_refuse_a_served_repository(world: World, tmp_path: Path) -> None:
    """The database decides what a server's repository lists: `repo add-target` and
    `remove-target` there would be undone at its next start, so they refuse."""
    artifact = tmp_path / "fix.mpatch"
    artifact.write_bytes(world.artifact)
    repository = world.server.data / "repository"
    for args in (("add-target", repository, artifact), ("remove-target", repository, "x")):
        done = micropatch("repo", *args)
        assert done.returncode == 1 and "is the repository of a fleet server" in done.stderr
        assert "micropatch publish" in done.stderr
    assert world.published() == set()
