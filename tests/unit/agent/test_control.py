"""agent/control.py: what a request's own failure looks like to the client, against a
client hanging up (which gets silence)."""

from __future__ import annotations

import errno
import json
import socket
import threading
from pathlib import Path
from typing import Any

from micropatch.agent.control import ControlServer
from micropatch.errors import AgentError, from_wire


class _Failing(ControlServer):
    """A control server whose every request fails in its own work with ENOSPC."""

    def _dispatch(self, op: str, args: dict[str, Any]) -> Any:
        raise OSError(errno.ENOSPC, "No space left on device", "/var/lib/micropatch/store")


def _serve_one(server: ControlServer, request: bytes) -> bytes:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    worker = threading.Thread(target=server._serve, args=(theirs,))
    worker.start()
    with ours:
        ours.sendall(request)
        answer = ours.makefile("rb").readline()
    worker.join(timeout=5)
    assert not worker.is_alive()
    return answer


def test_an_oserror_of_the_work_is_answered_not_silence(tmp_path: Path) -> None:
    server = _Failing(agent=None, path=tmp_path / "agent.sock")  # type: ignore[arg-type]
    answer = json.loads(_serve_one(server, b'{"op": "rescan"}\n'))
    assert answer["ok"] is False
    error = from_wire(answer["error"])
    assert isinstance(error, AgentError)
    assert "rescan failed" in str(error) and "No space left on device" in str(error)


def test_a_client_that_hangs_up_gets_nothing_and_the_server_carries_on(tmp_path: Path) -> None:
    server = _Failing(agent=None, path=tmp_path / "agent.sock")  # type: ignore[arg-type]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    ours.close()  # gone before it asked anything
    server._serve(theirs)  # returns without raising
