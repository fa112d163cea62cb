"""What `agent enroll` obtains from the fleet server and keeps in STATE/fleet.json
(0600: the host's credential is in it)."""

from __future__ import annotations

import json
import logging
import os
import platform
import urllib.error
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from micropatch.agent.fleet.server_api import HttpError, agent_version, machine_id, post_json
from micropatch.agent.store import write_private
from micropatch.errors import AgentError
from micropatch.files import read_bounded

log = logging.getLogger(__name__)

FLEET_FILE = "fleet.json"  # in the state directory
MAX_FLEET_FILE = 1 << 20  # fleet.json, the repository's root metadata


@dataclass(frozen=True)
class Enrollment:
    server: str
    credential: str
    repository: str
    host_id: int
    group: str
    checkin_interval: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        write_private(path, json.dumps(self.to_json(), indent=1).encode())

    def updated(self, answer: dict[str, Any]) -> Enrollment:
        """What a check-in answer changes of it (repository, group, interval)."""
        try:
            return Enrollment(
                self.server, self.credential,
                str(answer.get("repository", self.repository)), self.host_id,
                str(answer.get("group", self.group)),
                float(answer.get("checkin_interval", self.checkin_interval)),
            )  # fmt: skip
        except (TypeError, ValueError):
            return self


def load(path: Path) -> Enrollment | None:
    """The enrollment kept at `path`; None if there is none (or it is unreadable,
    said in the log: the host is then not enrolled)."""
    try:
        return Enrollment(**json.loads(read_bounded(path, MAX_FLEET_FILE)))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError) as e:
        log.warning("%s: unreadable (%s): not enrolled", path, e)
        return None


def request(url: str, token: str) -> Enrollment:
    """Trade a one-time token for this host's credential (POST /api/v1/enroll)."""
    body = {
        "token": token, "hostname": platform.node()[:255] or "localhost",
        "machine_id": machine_id(), "kernel": os.uname().release,
        "agent_version": agent_version(),
    }  # fmt: skip
    try:
        answer = post_json(f"{url}/api/v1/enroll", body)
    except HttpError as e:
        raise AgentError(f"enrollment refused: {e}") from None
    except (OSError, urllib.error.URLError) as e:
        raise AgentError(f"cannot reach {url}: {getattr(e, 'reason', e)}") from None
    try:
        return Enrollment(
            server=url, credential=str(answer["credential"]),
            repository=str(answer["repository"]), host_id=int(answer["host_id"]),
            group=str(answer["group"]), checkin_interval=float(answer["checkin_interval"]),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise AgentError(f"{url}: the enrollment answer is incomplete ({e!r})") from None
