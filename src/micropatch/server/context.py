"""What a running server holds, shared by the API, the console and the background
refresher: its settings, the database, the repository, the password hasher and
the caches of one server process."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request

from micropatch.server.auth import Passwords
from micropatch.server.catalogue import Catalogues
from micropatch.server.database import Database, database_url
from micropatch.server.push import Push, held_capacity
from micropatch.server.repository import Repository
from micropatch.server.seen import Seen
from micropatch.server.throttle import LoginThrottle

REPOSITORY_DIR = "repository"
SETTINGS_VARIABLE = "MICROPATCH_SERVER_SETTINGS"  # how `server run --workers N` passes them
PARENT_VARIABLE = "MICROPATCH_SERVER_PARENT"  # and its pid, which its workers die with


@dataclass
class Settings:
    """How a server runs: where its data is, which database, how often agents check in."""

    data_dir: Path
    database: str | None = None  # a URL; None: SQLite in data_dir
    checkin_interval: int = 60
    repository_url: str | None = None  # what agents fetch from; None: this server's /repository
    refresh_every: float = 600.0  # seconds between re-signing checks of the online roles

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "data_dir": str(self.data_dir)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Settings:
        return cls(**{**data, "data_dir": Path(data["data_dir"])})

    @classmethod
    def from_environment(cls) -> Settings:
        return cls.from_json(json.loads(os.environ[SETTINGS_VARIABLE]))


class Server:
    """What a running server holds: the database, the repository, the password hasher,
    the held check-ins."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The repository first: a data directory without one fails before a database
        # is created in it.
        self.repository = Repository(settings.data_dir / REPOSITORY_DIR)
        self.database = Database(database_url(settings.data_dir, settings.database))
        self.passwords = Passwords()
        self.catalogues = Catalogues()
        self.logins = LoginThrottle()
        self.push = Push(held_capacity())  # check-ins held until their answer changes
        self.seen = Seen()  # when hosts whose check-ins stored nothing else were seen

    def repository_url(self, request: Request) -> str:
        if self.settings.repository_url:
            return self.settings.repository_url.rstrip("/")
        return str(request.base_url).rstrip("/") + "/repository"


def server_of(request: Request) -> Server:
    """The server a request reached."""
    server: Server = request.app.state.server
    return server


async def reached(request: Request) -> Server:
    """`server_of` as a route dependency, on the event loop: FastAPI runs a plain function
    dependency in a thread, which cost every request a thread hop of its own — under
    load a wait for one of the few threads, counted as at work (server/capacity.py),
    check-ins that would be held among them."""
    return server_of(request)


def client_address(request: Request) -> str:
    """The address a request came from (of the proxy, behind one)."""
    return request.client.host if request.client else "unknown"
