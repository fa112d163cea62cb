"""The fleet server for real: the key ceremony and administration through the CLI,
`micropatch server run` under uvicorn, `micropatch publish`, and a simulated agent
(a plain HTTP client) that enrolls, checks in, and downloads through TUF from the
server's /repository. The real agent's side comes with issue 8."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from unit.server.conftest import (  # noqa: F401 (fixtures)
    fresh_postgres,
    make_artifact,
    module,
    signing_key,
)

from micropatch.server.updater import PatchUpdater
from micropatch.trust.artifact import loads
from micropatch.trust.keys import PrivateKey, generate_key, write_key_pair

# With $MICROPATCH_TEST_POSTGRES, every command below uses that PostgreSQL database
# (`--database` through its environment variable) instead of SQLite.
ENV: dict[str, str] = {}


@pytest.fixture(autouse=True)
def database() -> Iterator[None]:
    url = fresh_postgres()
    if url:
        ENV["MICROPATCH_SERVER_DATABASE"] = url
    yield
    ENV.clear()


def micropatch(*args: object, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["micropatch", *map(str, args)],
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
        env={**os.environ, "COLUMNS": "250", **ENV},
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def data_dir(tmp_path: Path, signing_key: PrivateKey) -> Path:  # noqa: F811
    """A data directory after the key ceremony: the signing key is the targets key."""
    keys = tmp_path / "keys"
    keys.mkdir()
    private, _ = write_key_pair(signing_key, keys / "patches")
    data = tmp_path / "data"
    done = micropatch(
        "repo", "init", data / "repository", "--offline-dir", tmp_path / "offline",
        "--root-keys", 2, "--root-threshold", 2, "--targets-key", private, "--online-targets",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Move" in done.stdout and "off this machine" in done.stdout
    assert sorted(p.name for p in (tmp_path / "offline").iterdir()) == [
        "root-1.key", "root-1.pub", "root-2.key", "root-2.pub"
    ]  # fmt: skip
    assert not list((data / "repository").rglob("root-*"))  # no root key beside the server
    return data


@pytest.fixture
def server(data_dir: Path) -> Iterator[str]:
    """`micropatch server run` on a free port; its URL once uvicorn says it is up."""
    port = free_port()
    process = subprocess.Popen(
        ["micropatch", "server", "run", "--data-dir", data_dir,
         "--listen", f"127.0.0.1:{port}", "--checkin-interval", "30"],
        stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV},
    )  # fmt: skip
    assert process.stderr is not None
    seen = []
    for line in process.stderr:
        seen.append(line)
        if "Uvicorn running on" in line:
            break
    else:
        process.wait(timeout=10)
        pytest.fail("the server did not start:\n" + "".join(seen))
    yield f"http://127.0.0.1:{port}"
    process.terminate()
    process.wait(timeout=30)


def test_enroll_checkin_publish_download_revoke(
    data_dir: Path,
    server: str,
    make_artifact,  # noqa: F811
    signing_key: PrivateKey,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Administration on the data directory, beside the running server.
    done = micropatch("server", "admin", "create-user", "olga", "--role", "operator",
                      "--data-dir", data_dir)  # fmt: skip
    assert done.returncode == 0, done.stderr
    operator = done.stdout.strip()
    done = micropatch("server", "admin", "enrollment-token", "--data-dir", data_dir)
    assert done.returncode == 0, done.stderr
    enrollment = done.stdout.strip()
    bad = micropatch("server", "admin", "create-user", "x", "--role", "root",
                     "--data-dir", data_dir)  # fmt: skip
    assert bad.returncode == 1 and "role 'root'" in bad.stderr

    # Publish through the CLI.
    data = make_artifact("fix-int", 1)
    artifact = tmp_path / loads(data).file_name
    artifact.write_bytes(data)
    done = micropatch("publish", artifact, "--server", server, "--token", operator)
    assert done.returncode == 0, done.stderr
    assert f"published fix-int v1 as {artifact.name}" in done.stdout
    refused = micropatch("publish", artifact, "--server", server, "--token", "mpu_wrong")
    assert refused.returncode == 1 and "401" in refused.stderr

    # A simulated agent: enroll, then check in with its inventory.
    with httpx.Client(base_url=server, timeout=30) as agent:
        r = agent.post("/api/v1/enroll", json={"token": enrollment, "hostname": "web-1",
                                               "kernel": "6.18", "agent_version": "0.1"})  # fmt: skip
        assert r.status_code == 201, r.text
        enrolled = r.json()
        assert enrolled["checkin_interval"] == 30
        assert enrolled["repository"] == f"{server}/repository"
        headers = {"Authorization": f"Bearer {enrolled['credential']}"}
        module_facts = loads(data).payload.module
        inventory = {
            "modules": [{"name": module_facts.name, "path": "/opt/libcheck.so",
                         "build_id": module_facts.build_id, "sha256": module_facts.sha256}],
            "processes": [],
            "events": [{"kind": "agent", "time": 1.0, "message": "started"}],
        }  # fmt: skip
        r = agent.post("/api/v1/checkin", json=inventory, headers=headers)
        assert r.status_code == 200, r.text
        [relevant] = r.json()["patches"]
        assert (relevant["patch_id"], relevant["state"]) == ("fix-int", "enabled")

        # Download through TUF from the server's /repository, then admit.
        root = (data_dir / "repository/public/metadata/1.root.json").read_bytes()
        updater = PatchUpdater(enrolled["repository"], tmp_path / "agent-cache",
                               keys=[signing_key.public], root=root)  # fmt: skip
        updater.refresh()
        assert [t.name for t in updater.targets()] == [relevant["target"]]
        admitted = updater.fetch(relevant["target"])
        assert (admitted.id, admitted.version) == ("fix-int", 1)

        # Revoke: the next check-in says so, and the target is gone from TUF.
        r = httpx.post(f"{server}/api/v1/patches/fix-int/revoke", json={},
                       headers={"Authorization": f"Bearer {operator}"})  # fmt: skip
        assert r.status_code == 200, r.text
        r = agent.post("/api/v1/checkin", json=inventory | {"events": []}, headers=headers)
        assert r.json()["patches"] == [] and r.json()["revoked"][0]["patch_id"] == "fix-int"
        updater.refresh()
        assert updater.targets() == []


def _raw_get(url: str, target: bytes) -> tuple[int, bytes]:
    """A GET of exactly `target` on a raw socket: no client normalises the path."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest


def test_the_repository_serves_nothing_outside_public(data_dir: Path, server: str) -> None:
    status, _ = _raw_get(server, b"/repository/metadata/timestamp.json")
    assert status == 200  # the raw client works
    key = (data_dir / "repository/online/timestamp.key").read_bytes()
    for outside in (b"/repository/../online/timestamp.key",
                    b"/repository/%2e%2e/online/timestamp.key",
                    b"/repository/metadata/../../online/timestamp.key",
                    b"/repository/..%2fonline/timestamp.key"):  # fmt: skip
        status, body = _raw_get(server, outside)
        assert status in (400, 404) and key not in body, (outside, status)


def test_server_needs_a_repository(tmp_path: Path) -> None:
    done = micropatch("server", "run", "--data-dir", tmp_path, "--listen", "127.0.0.1:1")
    assert done.returncode == 1
    assert "micropatch repo init" in done.stderr
    # A data directory mistyped is not made (empty, and without its repository).
    done = micropatch("server", "run", "--data-dir", tmp_path / "typo", "--listen", "127.0.0.1:1")
    assert done.returncode == 1 and "micropatch repo init" in done.stderr
    assert not (tmp_path / "typo").exists()


def test_server_workers_need_postgresql(data_dir: Path) -> None:
    done = subprocess.run(
        ["micropatch", "server", "run", "--data-dir", data_dir, "--listen", "127.0.0.1:1",
         "--workers", "2"], capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "MICROPATCH_SERVER_DATABASE"},
    )  # fmt: skip
    assert done.returncode == 1 and "--workers 2 needs --database postgresql" in done.stderr
    assert not (data_dir / "server.db").exists()  # refused before anything was made


def test_repo_commands(tmp_path: Path, make_artifact, signing_key: PrivateKey) -> None:  # noqa: F811
    keys = tmp_path / "keys"
    keys.mkdir()
    private, _ = write_key_pair(signing_key, keys / "patches")
    repo = tmp_path / "repo"
    assert micropatch("repo", "init", repo, "--root-keys", 1, "--root-threshold", 1,
                      "--targets-key", private).returncode == 0  # fmt: skip
    data = make_artifact("fix-cli", 1)
    artifact = tmp_path / "fix-cli.mpatch"
    artifact.write_bytes(data)
    offline = micropatch("repo", "add-target", repo, artifact)  # targets key not online
    assert offline.returncode == 1 and "needs 1 signature" in offline.stderr
    done = micropatch("repo", "add-target", repo, artifact, "--key", private)
    assert done.returncode == 0, done.stderr
    listed = micropatch("repo", "list", repo).stdout
    assert '"patch_id": "fix-cli"' in listed
    name = loads(data).file_name
    assert micropatch("repo", "remove-target", repo, name, "--key", private).returncode == 0
    assert micropatch("repo", "list", repo).stdout == ""
    done = micropatch("repo", "refresh-timestamp", repo, "--force")
    assert done.returncode == 0 and "snapshot, timestamp" in done.stdout


def test_repo_sign_root(tmp_path: Path) -> None:
    repo, offline = tmp_path / "repo", tmp_path / "offline"
    assert micropatch("repo", "init", repo, "--offline-dir", offline).returncode == 0
    meta = repo / "public/metadata"
    listed = micropatch("repo", "list", repo)
    assert listed.returncode == 0 and "root: version 1, expires " in listed.stderr
    assert "timestamp: version 1" in listed.stderr and "warning" not in listed.stderr

    wrong = tmp_path / "wrong"
    wrong.mkdir()
    stranger, _ = write_key_pair(generate_key("stranger"), wrong / "stranger")
    refused = micropatch("repo", "sign-root", repo, "--root-key", offline / "root-1.key",
                         "--root-key", stranger)  # fmt: skip
    assert refused.returncode == 1
    assert "needs 2 signature(s) by root keys of version 1" in refused.stderr
    assert "but 1 valid one(s) were given" in refused.stderr
    assert str(stranger) in refused.stderr and "nothing was written" in refused.stderr
    assert not (meta / "2.root.json").exists()

    done = micropatch("repo", "sign-root", repo, "--root-key", offline / "root-1.key",
                      "--root-key", offline / "root-3.key", "--expires-in", 400,
                      "--new-root-keys", 3, "--root-threshold", 2,
                      "--offline-dir", tmp_path / "offline-2",
                      "--remove-root-key", offline / "root-1.pub",
                      "--remove-root-key", offline / "root-2.pub",
                      "--remove-root-key", offline / "root-3.pub")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert f"root version 2: {meta / '2.root.json'}" in done.stdout
    assert "root keys: 2 of 3 needed" in done.stdout
    assert str(tmp_path / "offline-2" / "root-v2-1.key") in done.stdout
    assert f"Move {tmp_path / 'offline-2'} off this machine" in done.stdout
    assert "Copy 2.root.json and root.json (only those)" in done.stdout
    assert (meta / "root.json").read_bytes() == (meta / "2.root.json").read_bytes()
    assert "root: version 2" in micropatch("repo", "list", repo).stderr
    # The old keys no longer sign.
    old = micropatch("repo", "sign-root", repo, "--root-key", offline / "root-1.key",
                     "--root-key", offline / "root-2.key")  # fmt: skip
    assert old.returncode == 1 and "by root keys of version 2" in old.stderr
    missing = micropatch("repo", "sign-root", repo)
    assert missing.returncode == 1 and "--root-key" in missing.stderr


def test_concurrent_enrollment_and_checkins(data_dir: Path, server: str) -> None:
    """Eight hosts race for one enrollment token: one wins. Then eight hosts check in at
    once, repeatedly: every check-in succeeds (SQLite takes turns, PostgreSQL too)."""
    from concurrent.futures import ThreadPoolExecutor

    token = micropatch("server", "admin", "enrollment-token", "--data-dir", data_dir).stdout
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(
            lambda i: httpx.post(f"{server}/api/v1/enroll",
                                 json={"token": token.strip(), "hostname": f"r{i}"}, timeout=60),
            range(8),
        ))  # fmt: skip
    assert sorted(r.status_code for r in answers) == [201] + [401] * 7, [r.text for r in answers]

    admin = micropatch("server", "admin", "create-user", "root", "--role", "admin",
                       "--data-dir", data_dir).stdout.strip()  # fmt: skip
    credentials = []
    for i in range(8):
        r = httpx.post(f"{server}/api/v1/enrollment-tokens", json={},
                       headers={"Authorization": f"Bearer {admin}"})  # fmt: skip
        r = httpx.post(f"{server}/api/v1/enroll",
                       json={"token": r.json()["token"], "hostname": f"h{i}"})  # fmt: skip
        credentials.append(r.json()["credential"])

    def check_in(i: int) -> int:
        body = {
            "modules": [{"name": f"lib{n}.so", "build_id": f"{i:02x}{n:02x}" * 10}
                        for n in range(50)],
            "events": [{"kind": "blocked", "time": float(n), "pid": 100 + n} for n in range(20)],
        }  # fmt: skip
        r = httpx.post(f"{server}/api/v1/checkin", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {credentials[i % 8]}"})  # fmt: skip
        return r.status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(check_in, range(64)))
    assert statuses == [200] * 64
