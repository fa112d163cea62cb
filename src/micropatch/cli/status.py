"""`micropatch status`: what is applied where, read from the processes' registries
(through the agent when one runs); declared once, printed one way."""

from __future__ import annotations

from micropatch.cli import say
from micropatch.cli.scope import PID
from micropatch.cli.spec import Command
from micropatch.errors import MicropatchError, ProcessExited, ProcessNotFound, from_wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from micropatch.cli.spec import Values

COLUMNS = ("pid", "process", "module", "patch", "version", "sites", "since", "blocked")
GONE = (ProcessNotFound, ProcessExited)


def run(values: Values) -> None:
    from micropatch.cli import transport

    named: list[int] = values["pid"]
    try:
        client = transport.agent()
        if client is not None:
            answer = client.call("process-status", pids=named)
            states = answer["states"]
            unread = [(pid, from_wire(fields)) for pid, fields in answer["unread"]]
        else:
            states, unread = _read(named)
    except MicropatchError as e:
        raise say.fail(str(e)) from None
    # A process that exits between the scan and the read is no error, unless named.
    unread = [(pid, error) for pid, error in unread if named or not isinstance(error, GONE)]
    for pid, error in unread:
        say.failed(f"pid {pid}: {error}")
    if not named and client is None:
        _say_hidden()
    rows = [_row(s) for s in states]
    unread_pids = {pid for pid, _ in unread}
    read = [p for p in named if p not in unread_pids]
    if not rows and (read or not named):
        to = f" to pid {', '.join(map(str, read))}" if named else ""
        say.plain(f"no micropatch applied{to}")
    from micropatch.cli.report import table

    table(COLUMNS, rows)
    if named and unread:
        raise SystemExit(1)  # a process named on the command line could not be read


STATUS = Command(
    "status",
    "Show what is applied: to the given processes, or to every patched process.\n\n"
    "On a terminal, a table; otherwise one tab-separated line per patch, for scripts. "
    "Read through the host agent when one runs.",
    (),
    (PID,),
    run,
)
COMMANDS = {"status": STATUS}


def _read(named: list[int]) -> tuple[list[dict[str, Any]], list[tuple[int, MicropatchError]]]:
    """The states (as the agent sends them) of the named processes, or of every
    patched one, read here."""

    from micropatch.runtimes.engines import patched_pids, status

    states, unread = [], []
    for pid in named or patched_pids():
        try:
            states += status(pid)
        except MicropatchError as e:
            unread.append((pid, e))
    return states, unread


def _row(s: dict[str, Any]) -> tuple[str, ...]:
    import time

    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s["applied_at"]))
    python = s.get("runtime") == "cpython"
    sites = ",".join(str(a) if python else f"{a:#x}" for a in s["sites"])
    blocked = "-" if s["blocked"] is None else str(s["blocked"])
    version = str(s["version"])
    if s.get("state", "applied") != "applied":
        version += f" ({s['state']}: interrupted; `micropatch repair --pid {s['pid']}`)"
    module = f"{s['module']} (cpython)" if python else s["module"]
    return (str(s["pid"]), s["process"], module, s["patch_id"], version, sites, since,
            blocked)  # fmt: skip


def _say_hidden() -> None:
    """Not root: processes of other users cannot be read, and their patches would be
    left out without a word."""
    import os

    if os.geteuid() == 0:
        return
    from micropatch.process.select import all_pids

    hidden = 0
    for pid in all_pids():
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                f.read(1)
        except PermissionError:
            hidden += 1
        except OSError:
            continue  # gone
    if hidden:
        say.warning(
            f"{hidden} processes of other users could not be read, so patches applied to "
            "them are not shown; run as root to see every process"
        )
