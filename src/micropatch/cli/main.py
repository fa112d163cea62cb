"""The typer app of the `micropatch` command: the commands, with their help.

The console script is `entry.py`: it runs apply, remove, update and status
itself when it can read their command line, and otherwise the app of this
module made for the one command named (`app_for`): building typer's command
tree for every command costs more than most commands do. `micropatch --help`,
an unknown command and `micropatch.cli.main.app` (tests) get every command.
Each command imports what it uses when it runs; apply, remove, update and
status are declared as data (`change.py`, `status.py`) and added by `typed.py`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from micropatch.cli import say
from micropatch.cli.options import AllOption, PidOption, fail, stdout_console
from micropatch.errors import MicropatchError

HELP = "In-memory micropatching of running Linux x86-64 processes."


def _print_version(value: bool) -> None:
    if value:
        from micropatch import __version__

        print(f"micropatch {__version__}")
        raise typer.Exit()


def _options(
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose",
            "-v",
            count=True,
            show_default=False,
            metavar="",
            help="Log what the engine does: -v each operation, -vv every stop, write, "
            "move, retry and rollback.",
        ),
    ] = 0,
    _version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_print_version, help="Show the version and exit."
        ),
    ] = False,
) -> None:
    from micropatch.cli.entry import configure_logging

    configure_logging(verbose)


def repair(pid: PidOption = None, all_: AllOption = False) -> None:
    """Complete or roll back an operation whose patcher was killed midway.

    Every apply, remove and update does this first by itself; `status` shows
    such a process with the patch's state (applying, removing). Either runtime."""
    from micropatch.runtimes import engines

    if bool(pid) == all_:
        raise say.fail("name the processes with --pid PID (repeatable), or use --all")
    from micropatch.process.watchdog import watching

    # --all: the patched processes a look without a stop cannot tell settled (each is
    # stopped only if so); --pid: those named, each in its stop.
    patched = engines.patched_pids() if all_ else []
    pids = [p for p in patched if engines.needs_repair(p)] if all_ else list(pid or [])
    failures = repaired = 0
    for p in pids:
        try:
            with watching():
                done = engines.repair(p)
        except MicropatchError as e:
            failures += 1
            say.failed(f"pid {p}: {e}")
            continue
        repaired += bool(done)
        if not done and not all_:  # --all: only what was repaired, then a summary
            done = ["nothing to repair"]
        for line in done:
            say.plain(f"pid {p}: {line}")
    if all_:
        processes = f"{len(patched)} patched process{'' if len(patched) == 1 else 'es'}"
        say.plain(
            f"repair: {processes}, {len(pids)} to look at, {repaired} repaired, {failures} failed"
        )
    if failures:
        raise typer.Exit(1)


def demo() -> None:
    """Live demo: exploit a toy service, patch it live, see the exploit blocked, unpatch."""
    from micropatch.demo.runner import run

    try:
        run(stdout_console())
    except MicropatchError as e:
        raise fail(str(e)) from None


# --- which module adds which commands --------------------------------------------


def _declared(app: typer.Typer) -> None:
    from micropatch.cli import change, status, typed

    for command in (*change.COMMANDS.values(), *status.COMMANDS.values()):
        typed.add(app, command)


def _own(app: typer.Typer) -> None:
    app.command()(repair)
    app.command()(demo)


def _authoring(app: typer.Typer) -> None:
    from micropatch.cli import authoring

    authoring.register(app)


def _dev(app: typer.Typer) -> None:
    from micropatch.cli import dev

    app.add_typer(dev.app, name="dev")


def _agent(app: typer.Typer) -> None:
    from micropatch.cli import agent

    app.add_typer(agent.app, name="agent")


def _tools(app: typer.Typer) -> None:
    from micropatch.cli import tools

    tools.register(app)


def _server(app: typer.Typer) -> None:
    from micropatch.cli import server

    server.register(app)


# Each top-level command, and what adds it (with the others of its module). In the
# order of `micropatch --help`.
ADDERS: dict[str, Callable[[typer.Typer], None]] = {
    **dict.fromkeys(("apply", "remove", "update", "status"), _declared),
    **dict.fromkeys(("repair", "demo"), _own),
    **dict.fromkeys(("build", "sign", "verify", "inspect", "keys"), _authoring),
    "dev": _dev,
    "agent": _agent,
    **dict.fromkeys(("explore", "diff"), _tools),
    **dict.fromkeys(("repo", "server", "publish"), _server),
}


def _one_suggestion() -> dict[str, Any]:
    """What makes a mistyped command get one "Did you mean …": click 8.4+ says it
    itself (NoSuchCommand), and typer 0.20 (suggest_commands) would say it again."""
    import inspect

    import click.exceptions

    if hasattr(click.exceptions, "NoSuchCommand") and (
        "suggest_commands" in inspect.signature(typer.Typer).parameters
    ):
        return {"suggest_commands": False}
    return {}


def app_for(command: str | None = None) -> typer.Typer:
    """The app with `command` and the commands of its module; every command for
    None or a name that is not a command (then typer says so, with suggestions)."""
    app = typer.Typer(
        help=HELP,
        no_args_is_help=True,
        add_completion=False,
        # Help is Markdown: a docstring's paragraphs are reflowed to the width of the
        # terminal (80 when piped), not broken where the source breaks its lines.
        rich_markup_mode="markdown",
        **_one_suggestion(),
    )
    app.callback()(_options)
    register = ADDERS.get(command or "")
    for add in [register] if register is not None else dict.fromkeys(ADDERS.values()):
        add(app)
    return app


if TYPE_CHECKING:
    app: typer.Typer


def __getattr__(name: str) -> Any:
    if name == "app":  # every command, made when asked for (CliRunner tests)
        return app_for()
    raise AttributeError(f"module 'micropatch.cli.main' has no attribute {name!r}")


def main() -> None:
    from micropatch.cli.entry import main as entry

    entry()


if __name__ == "__main__":
    main()
