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

from micropatch.cli.options import err, fail, out, warn
from micropatch.errors import MicropatchError

if TYPE_CHECKING:
    from micropatch.agent.client import AgentClient

NO_AGENT_VARIABLE = "MICROPATCH_NO_AGENT"
GONE = ("ProcessNotFound", "ProcessExited")
SKIPPED = ("NotApplied", "AlreadyApplied", "Downgrade")


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
    if answer.get("verified"):
        out.print(f"[green]✓[/] {escape(answer['verified'])}")
    for warning in answer.get("warnings") or []:
        warn(warning)
    fleet = arguments.get("filters") is not None
    done = 0
    failures = len(answer["unreadable"])
    skipped, gone = answer["skipped"], answer["gone"]
    for pid, fields in answer["unreadable"]:
        err.print(f"[red]✗[/] pid {pid}: cannot read its patches: {escape(fields['message'])}")
    for result in answer["results"]:
        pid = result["pid"]
        if "error" in result:
            error = result["error"]
            message = escape(str(error.get("message", "")))
            if fleet and error.get("error") in GONE:
                gone += 1
                err.print(f"[dim]· pid {pid}: gone ({message})[/]")
            elif fleet and error.get("error") in SKIPPED:
                skipped += 1
                err.print(f"[dim]· pid {pid}: skipped ({message})[/]")
            else:
                failures += 1
                err.print(f"[red]✗[/] pid {pid}: {message}")
            continue
        o = result["outcome"]
        done += 1
        version = f" v{o['version']}" if o["version"] is not None else ""
        out.print(
            f"[green]✓[/] {o['action']} {o['patch_id']}{version} "
            f"({o['sites']} site{'s' if o['sites'] != 1 else ''}) in pid {pid}; "
            f"paused {o['paused'] * 1e3:.2f} ms"
            + (f" after {o['attempts']} attempts" if o["attempts"] > 1 else "")
            + " (through the agent)"
        )
    if not answer["results"] and not fleet:
        out.print(f"no process to {verb}")
    if fleet or len(answer["results"]) > 1:
        out.print(f"{verb}: {done} done, {failures} failed, {skipped} skipped, {gone} gone")
    if failures:
        raise typer.Exit(1)


def status(client: AgentClient, pids: list[int] | None) -> tuple[list[dict[str, Any]], list[Any]]:
    """The registries' states (as dicts of live.PatchState) and the unread pids."""
    try:
        answer = client.call("process-status", pids=pids or [])
    except MicropatchError as e:
        raise fail(str(e)) from None
    return answer["states"], answer["unread"]
