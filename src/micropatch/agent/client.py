"""Talk to a running agent over its control socket.

Light on purpose: the standard library and micropatch.errors only (no pydantic,
pyelftools, iced, keystone or cryptography), so `micropatch status` through the
agent starts as fast as the interpreter. See control.py for the protocol.
"""

from __future__ import annotations

import binascii
import json
import os
import socket

from micropatch import errors
from micropatch.errors import ControlError, MicropatchError, from_wire
from micropatch.files import read_bounded

TYPE_CHECKING = False  # not imported from typing, which the quick path would pay for
if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path
    from typing import Any

DEFAULT_SOCKET = "/run/micropatch/agent.sock"
SOCKET_VARIABLE = "MICROPATCH_AGENT_SOCKET"  # where the CLI looks for a running agent


def default_socket() -> str:
    """The socket the CLI talks to: $MICROPATCH_AGENT_SOCKET, else the default."""
    return os.environ.get(SOCKET_VARIABLE) or DEFAULT_SOCKET


CONNECT_TIMEOUT = 2.0
# trust.envelope.MAX_SIZE, not imported from there: it loads the trust layer (a test checks
# they agree)
MAX_ARTIFACT = 64 << 20


class AgentClient:
    """One request per connection: `call(op, **arguments)` → the result."""

    def __init__(self, path: str | Path | None = None, *, timeout: float | None = None) -> None:
        self.path = str(path or default_socket())
        self.timeout = timeout  # None: wait as long as the agent works (an apply may queue)

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(self.path)
        except PermissionError:
            sock.close()
            raise ControlError(
                f"permission denied: cannot connect to the agent's socket {self.path}; it "
                "answers root (and its read-only group, if configured)"
            ) from None
        except OSError as e:
            sock.close()
            raise ControlError(
                f"no agent answers on {self.path} ({e.strerror or e}); start it with "
                "`micropatch agent run` or `systemctl start micropatch-agent`"
            ) from None
        sock.settimeout(self.timeout)
        return sock

    def _request(self, op: str, arguments: dict[str, Any]) -> tuple[socket.socket, Any]:
        sock = self._connect()
        try:
            try:
                sock.sendall(json.dumps({"op": op, **arguments}).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError) as e:
                # The agent answered before it read the whole request (it refused the
                # peer: a write verb of a large artifact hits this): its answer says why.
                with sock.makefile("rb") as early:
                    try:
                        message = _read(early, self.path)
                    except (ControlError, ValueError):
                        raise ControlError(f"agent at {self.path}: {e}") from None
                raise _result_error(message) from None
            stream = sock.makefile("rb")
        except OSError as e:
            sock.close()
            raise ControlError(f"agent at {self.path}: {e}") from None
        except MicropatchError:
            sock.close()
            raise
        return sock, stream

    def call(self, op: str, **arguments: Any) -> Any:
        sock, stream = self._request(op, arguments)
        with sock, stream:
            return _result(_read(stream, self.path))

    def stream(self, op: str, **arguments: Any) -> Iterator[dict[str, Any]]:
        """A streaming request (events with follow): the first response's items, then
        each message as it comes, until the agent stops or the caller stops iterating."""
        sock, stream = self._request(op, arguments)
        with sock, stream:
            yield from ({"event": item} for item in _result(_read(stream, self.path)))
            while True:
                message = _read(stream, self.path, eof_ok=True)
                if message is None:
                    return
                if "event" in message:
                    yield message

    # --- the verbs ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return dict(self.call("status"))

    def add(self, path: str | Path, state: str | None = None) -> dict[str, Any]:
        return dict(self.call("add", **artifact_arguments(path), state=state))

    def events(self, *, follow: bool = False, **filters: Any) -> Any:
        if follow:
            return self.stream("events", follow=True, **filters)
        return self.call("events", **filters)


def artifact_arguments(path: str | Path) -> dict[str, str]:
    """An artifact file as request arguments: its bytes (the agent may not see our
    /tmp) and its name for messages."""
    try:
        data = read_bounded(path, MAX_ARTIFACT)
    except OSError as e:
        raise errors.ArtifactError(f"{path}: cannot read: {e.strerror}") from e
    return {"artifact": binascii.b2a_base64(data, newline=False).decode("ascii"), "name": str(path)}


def running(path: str | Path | None = None) -> AgentClient | None:
    """A client of the agent if one answers on the socket (else None, quickly: a
    socket file with nobody behind it refuses at once)."""
    client = AgentClient(path)
    if not os.path.exists(client.path):
        return None
    try:  # not contextlib.suppress: the quick path does not import contextlib
        client._connect().close()
    except (ControlError, OSError):
        return None
    return client


def _read(stream: Any, path: str, *, eof_ok: bool = False) -> Any:
    try:
        line = stream.readline()
    except OSError as e:
        raise ControlError(f"agent at {path}: {e}") from None
    if not line:
        if eof_ok:
            return None
        raise ControlError(f"the agent at {path} closed the connection without an answer")
    return json.loads(line)


def _result(message: dict[str, Any]) -> Any:
    if message.get("ok"):
        return message.get("result")
    raise from_wire(message.get("error") or {})


def _result_error(message: Any) -> MicropatchError:
    """The error an early answer carries (an answer before the request was read is
    never a success)."""
    if isinstance(message, dict) and not message.get("ok"):
        return from_wire(message.get("error") or {})
    return ControlError(f"the agent answered before reading the request: {message!r}")
