"""`micropatch agent ...`: run the host agent, install it, and talk to it.

Thin: the verbs that talk to a running agent import only agent/client.py (no
engine, no crypto); `run` imports the agent itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from micropatch.agent.paths import (
    DEFAULT_CONFIG,
    DEFAULT_SOCKET,
    DEFAULT_STATE_DIR,
    DEFAULT_TRUST_DIR,
    SOCKET_VARIABLE,
)
from micropatch.cli.options import escape, fail, out
from micropatch.errors import MicropatchError

if TYPE_CHECKING:
    from micropatch.agent.client import AgentClient

app = typer.Typer(
    help="The host agent: keeps every running and new process patched by policy.",
    no_args_is_help=True,
)

SocketOption = Annotated[
    Path | None,
    typer.Option(
        "--socket",
        help=f"The agent's control socket (default ${SOCKET_VARIABLE}, else {DEFAULT_SOCKET}).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="JSON instead of a table.")]
WaitOption = Annotated[
    bool,
    typer.Option(
        "--wait",
        help="Return once every matching running process carries the patch (or, disabled, "
        "none does), and say how many.",
    ),
]
TimeoutOption = Annotated[
    float, typer.Option("--timeout", min=0.1, max=86400, help="Seconds --wait waits at most.")
]


def _client(socket: Path | None) -> AgentClient:
    from micropatch.agent.client import AgentClient

    return AgentClient(socket)


def _call(socket: Path | None, op: str, **arguments: Any) -> Any:
    try:
        return _client(socket).call(op, **arguments)
    except MicropatchError as e:
        raise fail(str(e)) from None


@app.command()
def run(
    state_dir: Annotated[Path, typer.Option(help="Store and database.")] = Path(DEFAULT_STATE_DIR),
    socket: Annotated[Path, typer.Option(help="Control socket.")] = Path(DEFAULT_SOCKET),
    trust_dir: Annotated[Path, typer.Option(help="Trusted keys (*.pub).")] = Path(
        DEFAULT_TRUST_DIR
    ),
    config: Annotated[Path, typer.Option(help="Configuration (TOML); absent: defaults.")] = Path(
        DEFAULT_CONFIG
    ),
) -> None:
    """Run the agent in the foreground (systemd Type=notify, or a terminal).

    Events go to stdout as JSON lines (journald keeps them) and to the history. The
    process's stops are watched (agent/stopwatch.py) from before the agent starts
    until it has stopped."""
    import logging

    from micropatch.agent.config import load_config
    from micropatch.agent.paths import AgentPaths
    from micropatch.agent.service import Agent
    from micropatch.agent.stopwatch import StopWatch

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = load_config(config)
        agent = Agent(settings, AgentPaths(state_dir, socket, trust_dir))
    except MicropatchError as e:
        raise fail(str(e)) from None
    watch = StopWatch(settings.stop_limit, agent.paths.state_dir, agent.report)
    watch.start()
    try:
        agent.run()
    except MicropatchError as e:
        raise fail(str(e)) from None
    finally:
        watch.stop()
        agent.close()


@app.command()
def install(
    root: Annotated[
        Path, typer.Option(help="Install under this directory instead of / (tests, images).")
    ] = Path("/"),
) -> None:
    """Write the systemd unit, the default configuration and the directories."""
    from micropatch.agent.install import install as do_install

    done = do_install(root)
    for path in done.written:
        out.print(f"[green]✓[/] wrote {escape(path)}")
    for path in done.kept:
        out.print(f"· kept {escape(path)}")
    for note in done.notes:
        out.print(escape(note))


@app.command()
def uninstall(
    root: Annotated[Path, typer.Option(help="Uninstall from under this directory.")] = Path("/"),
) -> None:
    """Remove the systemd unit (stopping the service); the state, configuration and
    keys stay, and so do the patches in running processes."""
    from micropatch.agent.install import uninstall as do_uninstall

    done = do_uninstall(root)
    for path in done.written:
        out.print(f"[green]✓[/] removed {escape(path)}")
    for path in done.kept:
        out.print(f"· kept {escape(path)}")


@app.command()
def status(socket: SocketOption = None, json_: JsonOption = False) -> None:
    """Patches, their state, processes covered and blocked counts."""
    snapshot = _call(socket, "status")
    if json_:
        print(json.dumps(snapshot, indent=2))
        return
    from micropatch.cli.agentstatus import show

    show(snapshot)


def _settle(socket: Path | None, patch_id: str, timeout: float) -> None:
    """--wait: until the running processes are as the policy says; how many carry it."""
    done = _call(socket, "wait", patch_id=patch_id, timeout=timeout)
    n = done["carriers"]
    where = f"{n} running process{'es' if n != 1 else ''}"
    if done["state"] == "enabled":
        out.print(f"[green]✓[/] {patch_id} v{done['version']} carried by {where} "
                  f"({done['seconds']:.1f} s)")  # fmt: skip
    else:
        left = f"still carried by {where} (pinned by an operator)" if n else "carried by none"
        out.print(f"[green]✓[/] {patch_id} {left} ({done['seconds']:.1f} s)")


def _add(
    socket: Path | None, artifact: Path, state: str | None, update: bool, wait: bool,
    timeout: float,
) -> None:  # fmt: skip
    from micropatch.agent.client import artifact_arguments

    try:
        arguments = artifact_arguments(artifact)
    except MicropatchError as e:
        raise fail(str(e)) from None
    done = _call(socket, "add", **arguments, state=state, update=update)
    replaced = f", replacing version {done['replaced']}" if done["replaced"] else ""
    out.print(f"[green]✓[/] added {done['id']} v{done['version']} ({done['state']}){replaced}")
    if wait:
        _settle(socket, done["id"], timeout)


@app.command()
def add(
    artifact: Annotated[Path, typer.Argument(help="Signed artifact (.mpatch).")],
    enabled: Annotated[
        bool | None,
        typer.Option("--enabled/--disabled", help="State of the patch (default: default_state)."),
    ] = None,
    wait: WaitOption = False,
    timeout: TimeoutOption = 60.0,
    socket: SocketOption = None,
) -> None:
    """Add a signed patch to the agent's store: running processes get it live (a newer
    version of a stored patch replaces it, updating them)."""
    state = None if enabled is None else "enabled" if enabled else "disabled"
    _add(socket, artifact, state, False, wait, timeout)


@app.command()
def update(
    artifact: Annotated[Path, typer.Argument(help="Signed artifact (.mpatch): a newer version.")],
    wait: WaitOption = False,
    timeout: TimeoutOption = 60.0,
    socket: SocketOption = None,
) -> None:
    """Replace a stored patch by a newer version (refused if the store does not hold the
    patch, or holds this version or a newer one): its carriers are updated live."""
    _add(socket, artifact, None, True, wait, timeout)


@app.command()
def enable(
    patch_id: Annotated[str, typer.Argument(help="Id of a stored patch.")],
    wait: WaitOption = False,
    timeout: TimeoutOption = 60.0,
    socket: SocketOption = None,
) -> None:
    """Enable a patch: every matching process gets it, live (and its crash
    auto-disables are lifted)."""
    _call(socket, "enable", patch_id=patch_id)
    out.print(f"[green]✓[/] {patch_id} enabled")
    if wait:
        _settle(socket, patch_id, timeout)


@app.command()
def disable(
    patch_id: Annotated[str, typer.Argument(help="Id of a stored patch.")],
    wait: WaitOption = False,
    timeout: TimeoutOption = 60.0,
    socket: SocketOption = None,
) -> None:
    """Disable a patch: it is removed from every process, live."""
    _call(socket, "disable", patch_id=patch_id)
    out.print(f"[green]✓[/] {patch_id} disabled")
    if wait:
        _settle(socket, patch_id, timeout)


@app.command()
def enroll(
    url: Annotated[str, typer.Argument(help="The fleet server, e.g. https://fleet:8600.")],
    token: Annotated[str, typer.Option("--token", help="A one-time enrollment token (mpe_…).")],
    root: Annotated[
        Path | None,
        typer.Option(
            "--root",
            help="The repository's trusted root (1.root.json of `micropatch repo init`); "
            "default: repository-root.json in the agent's trust directory.",
        ),
    ] = None,
    socket: SocketOption = None,
) -> None:
    """Enroll the running agent with a fleet server: it keeps the host's credential
    (0600, in its state directory) and checks in from then on."""
    arguments: dict[str, Any] = {"url": url, "token": token}
    if root is not None:
        try:
            arguments["root"] = root.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise fail(f"{root}: cannot read: {e}") from None
    done = _call(socket, "enroll", **arguments)
    out.print(
        f"[green]✓[/] enrolled with {escape(done['server'])} as host {done['host_id']} "
        f"(group {done['group']}); checking in every {done['checkin_interval']:g} s"
    )


@app.command()
def exclude(
    exe: Annotated[str | None, typer.Option("--exe", help="Executable path glob.")] = None,
    unit: Annotated[
        str | None, typer.Option("--unit", help="systemd unit (glob; `nginx` = nginx.service).")
    ] = None,
    user: Annotated[str | None, typer.Option("--user", help="User name or uid.")] = None,
    patch: Annotated[
        str | None, typer.Option("--patch", help="Only this patch (default: every patch).")
    ] = None,
    remove: Annotated[
        bool, typer.Option("--remove", help="Remove this exclusion instead of adding it.")
    ] = False,
    socket: SocketOption = None,
) -> None:
    """Keep patches (one, or all) off some processes, live; --remove lifts it."""
    given = [(k, v) for k, v in (("exe", exe), ("unit", unit), ("user", user)) if v]
    if len(given) != 1:
        raise fail("give exactly one of --exe GLOB, --unit NAME, --user NAME")
    kind, value = given[0]
    done = _call(socket, "unexclude" if remove else "exclude", kind=kind, value=value,
                 patch_id=patch)  # fmt: skip
    e = done["exclusion"]
    what = f"--{e['kind']} {e['pattern']}" + (f" --patch {e['patch_id']}" if e["patch_id"] else "")
    out.print(f"[green]✓[/] {'removed exclusion' if remove else 'excluded'} {what}")


@app.command()
def events(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Wait for new events.")] = False,
    json_: JsonOption = False,
    kind: Annotated[
        list[str] | None, typer.Option("--kind", help="Only events of this kind (repeatable).")
    ] = None,
    patch: Annotated[str | None, typer.Option("--patch", help="Only this patch.")] = None,
    pid: Annotated[int | None, typer.Option("--pid", help="Only this process.")] = None,
    limit: Annotated[int, typer.Option("--limit", help="The last N events of the history.")] = 100,
    socket: SocketOption = None,
) -> None:
    """The agent's events: applied, removed, updated, failed, blocked, crashed,
    disabled, rejected, skipped, agent."""
    filters = {"kinds": kind or [], "patch_id": patch, "pid": pid, "limit": limit}
    try:
        client = _client(socket)
        if follow:
            for message in client.stream("events", follow=True, **filters):
                _show_event(message["event"], json_)
        else:
            for event in client.call("events", **filters):
                _show_event(event, json_)
    except MicropatchError as e:
        raise fail(str(e)) from None
    except KeyboardInterrupt:
        pass


def _show_event(event: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(event), flush=True)
        return
    import time

    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event["time"]))
    message = event.get("message", "")
    pid = event.get("pid")
    # Most messages are whole sentences naming their pid already: it is not said twice.
    where = f" pid {pid}" if pid is not None and f"pid {pid}" not in message else ""
    print(f"{when} {event['kind']:<8}{where} {message}", flush=True)
