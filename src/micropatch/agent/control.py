"""The control socket: a Unix stream socket, one JSON request line per connection,
one JSON response line (and, for `events` with `follow`, one line per event
until the client hangs up).

Who may talk: root (SO_PEERCRED uid 0) for every verb; members of the
optional read-only group for the read verbs only. The socket file is 0600
root (0660 root:GROUP with a read-only group). Errors cross as data
(`errors.to_wire`: {"error": class name, "kinds": its bases, "message": ...,
fields}), and the client raises the same MicropatchError subclass
(`errors.from_wire`).

Requests: {"op": VERB, ...arguments}. Responses: {"ok": true, "result": ...}
or {"ok": false, "error": {...}}.
"""

from __future__ import annotations

import contextlib
import grp
import json
import logging
import os
import queue
import socket
import stat
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from micropatch.agent.events import EventFilter
from micropatch.errors import AgentError, ControlError, MicropatchError, to_wire

if TYPE_CHECKING:
    from micropatch.agent.service import Agent

log = logging.getLogger(__name__)

READ_VERBS = frozenset({"ping", "status", "events", "process-status", "wait"})
WRITE_VERBS = frozenset(
    {
        "add",
        "enable",
        "disable",
        "exclude",
        "unexclude",
        "apply",
        "remove",
        "update",
        "rescan",
        "enroll",
    }
)
MAX_REQUEST = 96 << 20  # an artifact (64 MiB at most) in base64, and the rest
UCRED = struct.Struct("3i")  # pid, uid, gid


def peer_credentials(conn: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel says."""
    data = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size)
    pid, uid, gid = UCRED.unpack(data)
    return pid, uid, gid


def _groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


class ControlServer:
    """Listens on the socket in a thread; each connection in a thread of its own."""

    def __init__(self, agent: Agent, path: Path, *, read_only_group: str | None = None) -> None:
        self.agent = agent
        self.path = Path(path)
        self.group: int | None = None
        if read_only_group is not None:
            try:
                self.group = (
                    int(read_only_group) if read_only_group.isdigit()
                    else grp.getgrnam(read_only_group).gr_gid
                )  # fmt: skip
            except KeyError:
                raise AgentError(
                    f"read_only_group {read_only_group!r}: no such group on this host"
                ) from None
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def start(self) -> None:
        self._prepare_dir()
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                if _answers(self.path):
                    raise AgentError(
                        f"another agent already answers on {self.path}; stop it first "
                        "(two agents would undo each other's work)"
                    )
                self.path.unlink()  # a dead agent's socket
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)  # never a moment with a wider mode than 0600
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        if self.group is not None:
            os.chown(self.path, 0, self.group)
            os.chmod(self.path, 0o660)
        sock.listen(64)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self._thread.start()

    def _prepare_dir(self) -> None:
        directory = self.path.parent
        if not directory.exists():
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self.group is not None:
            st = directory.stat()
            # Our own 0700 directory (e.g. /run/micropatch): let the group reach the socket
            # (search only, no listing, nobody else may write: live/lock.py accepts it).
            if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o700:
                directory.chmod(0o711)

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                continue
            threading.Thread(target=self._serve, args=(conn,), name="control-conn",
                             daemon=True).start()  # fmt: skip

    def _allowed(self, conn: socket.socket) -> str:
        """ "all", "read", or raise ControlError."""
        pid, uid, gid = peer_credentials(conn)
        if uid == 0:
            return "all"
        if self.group is not None and (gid == self.group or self.group in _groups(pid)):
            return "read"
        raise ControlError(
            f"permission denied: uid {uid} (pid {pid}) may not use the micropatch agent; "
            "its socket answers root"
            + (" and its read-only group" if self.group is not None else "")
        )

    def _serve(self, conn: socket.socket) -> None:
        # Answers go out with sendall, unbuffered: a client that hung up (a follower
        # stopped with ^C) is an OSError here, never a buffer left to flush at close.
        with conn, conn.makefile("rb") as stream:
            try:
                access = self._allowed(conn)
                line = stream.readline(MAX_REQUEST + 1)
                if not line:
                    return
                if len(line) > MAX_REQUEST:
                    raise ControlError("request too large")
                try:
                    request = json.loads(line)
                    op = request.pop("op")
                except (ValueError, KeyError, AttributeError, TypeError):
                    raise ControlError("bad request: one JSON object with an `op`") from None
                if op not in READ_VERBS | WRITE_VERBS:
                    raise ControlError(f"unknown request {op!r}")
                if op not in READ_VERBS and access != "all":
                    raise ControlError(
                        f"permission denied: `{op}` changes the agent; only root may; the "
                        "read-only group may use status and events"
                    )
                if op == "events" and request.get("follow"):
                    self._follow(conn, request)
                    return
                try:
                    result = self._dispatch(op, request)
                except OSError as e:
                    # The request's own work failed (a file, a process): an answer,
                    # not the silence the client's hanging up gets below.
                    log.exception("control request %s failed", op)
                    raise AgentError(f"{op} failed: {e}") from e
                _send(conn, {"ok": True, "result": result})
            except MicropatchError as e:
                with contextlib.suppress(OSError):
                    _send(conn, {"ok": False, "error": to_wire(e)})
            except OSError:
                return  # the client went away
            except Exception as e:
                log.exception("control request failed")
                with contextlib.suppress(OSError):
                    failure = AgentError(f"internal error: {e!r}")
                    _send(conn, {"ok": False, "error": to_wire(failure)})

    def _dispatch(self, op: str, args: dict[str, Any]) -> Any:
        from micropatch.agent import manual

        agent = self.agent
        if op == "ping":
            return {"pid": os.getpid(), "ready": agent.ready.is_set()}
        if op == "status":
            return agent.snapshot()
        if op == "process-status":
            return manual.status(args)
        if op == "events":
            return [e.to_json() for e in agent.events_since(_filter(args), args.get("limit"))]
        if op == "wait":
            from micropatch.agent.settle import settle

            timeout = args.get("timeout", 60.0)
            if not isinstance(timeout, int | float) or not 0 < timeout <= 86400:
                raise ControlError(f"bad request: timeout {timeout!r}: seconds, up to a day")
            return settle(agent, str(args["patch_id"]), float(timeout))
        if op == "add":
            data, name = agent.decode_artifact(args)
            return agent.add(data, name, args.get("state"), update=bool(args.get("update")))
        if op in ("enable", "disable"):
            return agent.set_enabled(str(args["patch_id"]), op == "enable")
        if op in ("exclude", "unexclude"):
            return agent.exclude(str(args["kind"]), str(args["value"]), args.get("patch_id"),
                                 remove=op == "unexclude")  # fmt: skip
        if op == "enroll":
            return agent.enroll(str(args["url"]), str(args["token"]), args.get("root"))
        if op == "rescan":
            agent.wake()
            return {}
        return manual.run(agent, op, args)

    def _follow(self, conn: socket.socket, args: dict[str, Any]) -> None:
        filt = _filter(args)
        with self.agent.events.follow(filt) as q:
            history = self.agent.events_since(filt, args.get("limit"))
            _send(conn, {"ok": True, "result": [e.to_json() for e in history]})
            sent = {(e.time, e.kind, e.pid, e.patch_id) for e in history}
            while not self._stopping.is_set():
                try:
                    event = q.get(timeout=1.0)
                except queue.Empty:
                    _send(conn, {"keepalive": True})  # finds a client that hung up
                    continue
                if event is None:
                    return
                if (event.time, event.kind, event.pid, event.patch_id) in sent:
                    continue  # recorded between follow() and the query: already sent
                _send(conn, {"event": event.to_json()})


def _answers(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def _filter(args: dict[str, Any]) -> EventFilter:
    kinds = args.get("kinds") or ()
    return EventFilter(tuple(kinds), args.get("patch_id"), args.get("pid"), args.get("since"))


def _send(conn: socket.socket, message: dict[str, Any]) -> None:
    conn.sendall(json.dumps(message, default=str).encode() + b"\n")
