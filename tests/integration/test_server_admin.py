"""`micropatch server admin …` beside a running server, for real: the README's fleet
flow (a group made before its enrollment token), and the lifecycle of credentials —
a disabled user's token refused at once, enabled again, a new password, tokens
revoked, a token that expires, names checked alike for the CLI and the API."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from unit.server.conftest import fresh_postgres, signing_key  # noqa: F401 (fixtures)

from .test_server import data_dir, database, micropatch, server  # noqa: F401 (fixtures)


def test_readme_fleet_flow_and_credentials(data_dir: Path, server: str) -> None:  # noqa: F811
    admin = ("--data-dir", data_dir)
    # As the README says: the group first, then a token for it.
    missing = micropatch("server", "admin", "enrollment-token", "--group", "/prod", *admin)
    assert missing.returncode == 1
    assert "create it with `micropatch server admin create-group /prod`" in missing.stderr
    done = micropatch("server", "admin", "create-group", "/prod", *admin)
    assert done.returncode == 0 and done.stdout.strip() == "created group /prod", done.stderr
    done = micropatch("server", "admin", "enrollment-token", "--group", "/prod", *admin)
    assert done.returncode == 0 and done.stdout.startswith("mpe_"), done.stderr
    enrolled = httpx.post(f"{server}/api/v1/enroll", timeout=30,
                          json={"token": done.stdout.strip(), "hostname": "web-1"})  # fmt: skip
    assert enrolled.status_code == 201 and enrolled.json()["group"] == "/prod"

    done = micropatch("server", "admin", "create-user", "alice", "--role", "admin",
                      "--password-stdin", "--token-expires", "30", *admin,
                      stdin="first-password\n")  # fmt: skip
    assert done.returncode == 0, done.stderr
    token = done.stdout.strip()

    def users(secret: str = token) -> httpx.Response:
        return httpx.get(f"{server}/api/v1/users", timeout=30,
                         headers={"Authorization": f"Bearer {secret}"})  # fmt: skip

    def login(password: str) -> httpx.Response:
        return httpx.post(f"{server}/api/v1/auth/token", timeout=30,
                          json={"name": "alice", "password": password})  # fmt: skip

    assert users().status_code == 200
    [listed] = [json.loads(line) for line in
                micropatch("server", "admin", "list-users", *admin).stdout.splitlines()]  # fmt: skip
    assert listed["name"] == "alice" and listed["role"] == "admin" and listed["disabled"] is None
    tokens = httpx.get(f"{server}/api/v1/tokens?user=alice", timeout=30,
                       headers={"Authorization": f"Bearer {token}"}).json()  # fmt: skip
    assert [t["label"] for t in tokens] == ["created with the user"]
    assert 29 * 86400 < tokens[0]["expires"] - tokens[0]["created"] <= 30 * 86400

    # Disabled: refused at once (the running server reads it at the next request).
    done = micropatch("server", "admin", "disable-user", "alice", *admin)
    assert done.returncode == 0, done.stderr
    refused = users()
    assert refused.status_code == 401 and "disabled" in refused.json()["detail"]
    assert login("first-password").status_code == 401
    done = micropatch("server", "admin", "enable-user", "alice", *admin)
    assert done.returncode == 0 and users().status_code == 200

    # A new password: the old one no longer logs in, the new one does.
    session = login("first-password").json()["token"]
    done = micropatch("server", "admin", "set-password", "alice", "--password-stdin", *admin,
                      stdin="second-password\n")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert users(session).status_code == 401  # its login tokens ended
    assert login("first-password").status_code == 401
    assert login("second-password").status_code == 200
    short = micropatch("server", "admin", "set-password", "alice", "--password-stdin", *admin,
                       stdin="short\n")  # fmt: skip
    assert short.returncode == 1 and "at least 8 characters" in short.stderr

    # Revoked: every token of the user.
    done = micropatch("server", "admin", "revoke-token", "--user", "alice", *admin)
    assert done.returncode == 0 and done.stdout.startswith("revoked 2 token(s)"), done.stdout
    assert users().status_code == 401
    neither = micropatch("server", "admin", "revoke-token", *admin)
    assert neither.returncode == 1 and "--user NAME" in neither.stderr

    # Names: the CLI refuses what the API refuses.
    bad = micropatch("server", "admin", "create-user", "bad name", "--role", "auditor", *admin)
    assert bad.returncode == 1 and "user name 'bad name'" in bad.stderr
    gone = micropatch("server", "admin", "disable-user", "nobody", *admin)
    assert gone.returncode == 1 and "no user 'nobody'" in gone.stderr

    # Deleted: gone from the list, its tokens refused.
    done = micropatch("server", "admin", "delete-user", "alice", *admin)
    assert done.returncode == 0 and done.stdout.strip() == "deleted alice", done.stderr
    assert micropatch("server", "admin", "list-users", *admin).stdout == ""
    assert users(session).status_code == 401
