"""The typer app of the `micropatch` command: every command, with its help.

The console script is `entry.py`, which runs apply, remove, update and status
itself when it can read their command line, and this app otherwise. Each
command imports what it uses when it runs; apply, remove, update and status
are declared as data (`change.py`, `status.py`) and added here by `typed.py`.
"""

from __future__ import annotations

from typing import Annotated

import typer

from micropatch.cli import agent, authoring, change, dev, say, server, status, tools, typed
from micropatch.cli.options import AllOption, PidOption, fail, stdout_console
from micropatch.errors import MicropatchError

app = typer.Typer(
    help="In-memory micropatching of running Linux x86-64 processes.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _options(
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            help="Log what the engine does: -v each operation, -vv every stop, write, "
            "move, retry and rollback.",
        ),
    ] = 0,
) -> None:
    from micropatch.cli.entry import configure_logging

    configure_logging(verbose)


for command in (*change.COMMANDS.values(), *status.COMMANDS.values()):
    typed.add(app, command)


@app.command()
def repair(pid: PidOption = None, all_: AllOption = False) -> None:
    """Complete or roll back an operation whose patcher was killed midway.

    Every apply, remove and update does this first by itself; `status` shows
    such a process with the patch's state (applying, removing)."""
    from micropatch import live

    if bool(pid) == all_:
        raise say.fail("name the processes with --pid PID (repeatable), or use --all")
    pids = live.patched_pids() if all_ else list(pid or [])
    failures = 0
    for p in pids:
        try:
            done = live.repair(p)
        except MicropatchError as e:
            failures += 1
            say.failed(f"pid {p}: {e}")
            continue
        for line in done or ["nothing to repair"]:
            say.plain(f"pid {p}: {line}")
    if failures:
        raise typer.Exit(1)


@app.command()
def demo() -> None:
    """Live demo: exploit a toy service, patch it live, see the exploit blocked, unpatch."""
    from micropatch.demo.runner import run

    try:
        run(stdout_console())
    except MicropatchError as e:
        raise fail(str(e)) from None


authoring.register(app)
app.add_typer(dev.app, name="dev")
app.add_typer(agent.app, name="agent")
tools.register(app)
server.register(app)


def main() -> None:
    from micropatch.cli.entry import main as entry

    entry()


if __name__ == "__main__":
    main()
