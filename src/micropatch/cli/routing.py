"""`micropatch apply|remove|update|status` through a running agent.

When an agent answers on its socket ($MICROPATCH_AGENT_SOCKET, else
/run/micropatch/agent.sock), these commands send it the request instead of
loading the engine: the agent admits the artifact with its own trust directory,
runs the operation with its caches, and the command prints what it answers,
as it would have printed it itself. Without an agent (or with
MICROPATCH_NO_AGENT=1, --trust, --allow-unsigned or --dry-run, which are the
operator's own choices about admission and scope) they run directly, as before.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from micropatch.cli.answers import describe
from micropatch.cli.options import err, fail, out, warn
from micropatch.errors import MicropatchError

if TYPE_CHECKING:
    from micropatch.agent.client import AgentClient

NO_AGENT_VARIABLE = "MICROPATCH_NO_AGENT"


def agent(*, direct: bool = False) -> AgentClient | None:
    """The running agent to go through, or None to run directly."""
    if direct or os.environ.get(NO_AGENT_VARIABLE):
        return None
    from micropatch.agent.client import running

    return running()


def filters(
    all_: bool, exe: list[str] | None, user: list[str] | None, unit: list[str] | None,
    cgroup: list[str] | None,
) -> dict[str, list[str]] | None:  # fmt: skip
    if not all_:
        return None
    return {"exe": exe or [], "user": user or [], "unit": unit or [], "cgroup": cgroup or []}


def run(
    client: AgentClient,
    verb: str,
    arguments: dict[str, Any],
    *,
    artifact: Path | None = None,
) -> None:
    """Send one apply/remove/update to the agent and report like a direct run."""
    from rich.markup import escape

    from micropatch.agent.client import artifact_arguments

    try:
        if artifact is not None:
            arguments = {**arguments, **artifact_arguments(artifact)}
        answer = client.call(verb, **arguments)
    except MicropatchError as e:
        raise fail(str(e)) from None
    report = describe(verb, answer, fleet=arguments.get("filters") is not None)
    for line in report.lines:
        text = escape(line.text)
        if line.kind == "warning":
            warn(line.text)
        elif line.to_stderr:
            err.print(f"[red]✗[/] {text}" if line.kind == "failed" else f"[dim]· {text}[/]")
        else:
            out.print(f"[green]✓[/] {text}" if line.kind == "ok" else text)
    if report.failed:
        raise typer.Exit(1)


def status(client: AgentClient, pids: list[int] | None) -> tuple[list[dict[str, Any]], list[Any]]:
    """The registries' states (as dicts of live.PatchState) and the unread pids."""
    try:
        answer = client.call("process-status", pids=pids or [])
    except MicropatchError as e:
        raise fail(str(e)) from None
    return answer["states"], answer["unread"]
