"""Where the agent keeps things, by default and for one running instance.

Light on purpose (standard library only): the CLI names these defaults in its
help without loading the agent. The socket's default lives with the client
(agent/client.py), which must not pay even for this module.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from micropatch.agent.client import DEFAULT_SOCKET, SOCKET_VARIABLE, default_socket
from micropatch.trust.paths import DEFAULT_TRUST_DIR

DEFAULT_STATE_DIR = "/var/lib/micropatch"
DEFAULT_CONFIG = "/etc/micropatch/agent.toml"
UNIT_NAME = "micropatch-agent.service"
UNIT_DIR = "/etc/systemd/system"

__all__ = [
    "DEFAULT_CONFIG",
    "DEFAULT_SOCKET",
    "DEFAULT_STATE_DIR",
    "DEFAULT_TRUST_DIR",
    "SOCKET_VARIABLE",
    "UNIT_DIR",
    "UNIT_NAME",
    "AgentPaths",
    "default_socket",
]


@dataclass(frozen=True)
class AgentPaths:
    """The files of one agent: its state directory, socket and trust directory."""

    state_dir: Path
    socket: Path
    trust_dir: Path

    @property
    def store(self) -> Path:
        """Admitted artifacts (`*.mpatch`), one file per patch id (its newest version)."""
        return self.state_dir / "store"

    @property
    def rejected(self) -> Path:
        """Artifacts found in the store that admission refused, moved aside, never applied."""
        return self.store / "rejected"

    @property
    def database(self) -> Path:
        """Policy state and event history (SQLite)."""
        return self.state_dir / "agent.db"

    def create(self) -> None:
        """The state directories, root's alone (0700)."""
        for directory in (self.state_dir, self.store, self.rejected):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
