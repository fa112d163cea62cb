"""Fixtures of the server tests: a small module, signed artifacts for it, a repository."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from micropatch.trust.keys import PrivateKey, generate_key

MODULE_C = """
int check(int n) {
    int r = n;
    if (n > 64)
        r = -2;
    return r * 3 + 1;
}
"""

MakeArtifact = Callable[..., bytes]


@pytest.fixture(scope="session")
def module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """libcheck.so: one function, `check`, built with the machine's cc."""
    out = tmp_path_factory.mktemp("module")
    (out / "check.c").write_text(MODULE_C)
    subprocess.run(
        ["cc", "-O0", "-fPIC", "-shared", "-Wl,--build-id", "-o", str(out / "libcheck.so"),
         str(out / "check.c")],
        check=True,
    )  # fmt: skip
    return out / "libcheck.so"


@pytest.fixture(scope="session")
def signing_key() -> PrivateKey:
    """The patch-signing key the hosts trust."""
    return generate_key("patches")


@pytest.fixture(scope="session")
def make_artifact(
    module: Path, signing_key: PrivateKey, tmp_path_factory: pytest.TempPathFactory
) -> MakeArtifact:
    """`make_artifact(id="fix", version=1, key=signing_key)` → the bytes of a signed artifact."""
    from micropatch.build.artifact import build
    from micropatch.elf.identity import identify

    with open(module, "rb") as f:
        build_id = identify(f).build_id
    out = tmp_path_factory.mktemp("artifacts")
    made: dict[tuple[str, int, str], bytes] = {}

    def make(
        id: str = "fix", version: int = 1, key: PrivateKey | None = None, code: str = "nop"
    ) -> bytes:
        key = key or signing_key
        cached = made.get((id, version, key.public.keyid + code))
        if cached is not None:
            return cached
        source = out / f"{id}-{version}-{len(made)}.toml"
        source.write_text(
            f'[patch]\nid = "{id}"\nversion = {version}\ntitle = "{id} v{version}"\n\n'
            f'[target]\nmodule = "{module.name}"\nbuild_id = "{build_id}"\n\n'
            f'[[patchlet]]\nat = "check"\ncode = "{code}"\n'
        )
        data = build(source, module).signed(key).to_bytes()
        made[(id, version, key.public.keyid + code)] = data
        return data

    return make


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """`served(directory)` → the URL of a static HTTP server of that directory on
    127.0.0.1 (any web server would do: the repository is static files)."""
    import functools
    import http.server
    import threading

    servers: list[http.server.ThreadingHTTPServer] = []

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

    def serve(directory: Path) -> str:
        handler = functools.partial(Quiet, directory=str(directory))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield serve
    for s in servers:
        s.shutdown()
        s.server_close()


def fresh_postgres() -> str | None:
    """$MICROPATCH_TEST_POSTGRES (postgresql://…) with every table dropped, or None:
    the server tests then run against PostgreSQL instead of SQLite."""
    import os

    url = os.environ.get("MICROPATCH_TEST_POSTGRES")
    if not url:
        return None
    from micropatch.server.database import database_url, make_engine
    from micropatch.server.models import Base

    engine = make_engine(database_url(".", url))
    with engine.begin() as connection:
        Base.metadata.drop_all(connection)
        connection.exec_driver_sql("DROP TABLE IF EXISTS alembic_version")
    engine.dispose()
    return url


class Api:
    """A server on a fresh data directory, with a TestClient and a user of each role."""

    def __init__(self, data_dir: Path, signing_key: PrivateKey) -> None:
        from fastapi.testclient import TestClient

        from micropatch.server.app import create_app
        from micropatch.server.ceremony import init_repository
        from micropatch.server.context import Server, Settings
        from micropatch.server.fleet import users

        init_repository(
            data_dir / "repository",
            offline_dir=data_dir / "offline",
            root_keys=1,
            root_threshold=1,
            targets_keys=[signing_key],
            online_targets=True,
        )
        self.settings = Settings(
            data_dir=data_dir, database=fresh_postgres(), repository_url="http://repo.invalid/r"
        )
        self.server = Server(self.settings)
        self.app = create_app(self.settings, server=self.server)
        self.client = TestClient(self.app)
        self.tokens: dict[str, str] = {}
        with self.server.database.session() as session:
            for role in ("admin", "operator", "auditor"):
                _, self.tokens[role] = users.create_user(
                    session, self.server.passwords, role, role, None, "test"
                )

    def auth(self, who: str | None) -> dict[str, str]:
        return {} if who is None else {"Authorization": f"Bearer {self.tokens[who]}"}

    def enroll(self, name: str, group: str = "/") -> tuple[int, str]:
        """A host enrolled through the API; its id and credential (also in tokens[name])."""
        r = self.client.post(
            "/api/v1/enrollment-tokens", json={"group": group}, headers=self.auth("admin")
        )
        assert r.status_code == 201, r.text
        r = self.client.post("/api/v1/enroll", json={"token": r.json()["token"], "hostname": name})
        assert r.status_code == 201, r.text
        self.tokens[name] = r.json()["credential"]
        return r.json()["host_id"], r.json()["credential"]

    def close(self) -> None:
        self.client.close()
        self.server.database.dispose()


@pytest.fixture
def api(tmp_path: Path, signing_key: PrivateKey) -> Iterator[Api]:
    a = Api(tmp_path / "data", signing_key)
    yield a
    a.close()
