"""`micropatch dev …`: the patch author's loop."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from micropatch.cli.options import AllowUnsignedOption, TrustOption, err, escape
from micropatch.errors import MicropatchError

if TYPE_CHECKING:
    from micropatch.live import devrun
    from micropatch.trust.admission import Admitted

app = typer.Typer(help="Developer tools: run a program with a patch applied from its start.")


def _say(message: str) -> None:
    """A line of ours on stderr; `message` is markup: escape what it quotes."""
    err.print(f"[dim]micropatch:[/] {message}")


@app.command(
    "run",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
)
def run(
    patch_file: Annotated[
        Path,
        typer.Argument(help="Signed artifact (.mpatch); a TOML source needs --allow-unsigned."),
    ],
    command: Annotated[list[str], typer.Argument(help="-- COMMAND ARGS…: the program to run.")],
    trust: TrustOption = None,
    allow_unsigned: AllowUnsignedOption = False,
    no_patch: Annotated[
        bool, typer.Option("--no-patch", help="Run the command without the patch, to compare.")
    ] = False,
    keep_going: Annotated[
        bool,
        typer.Option(
            "--keep-going", help="If the patch cannot be applied, let the program run unpatched."
        ),
    ] = False,
) -> None:
    """Start COMMAND stopped before its first instruction, apply the patch to its
    module (at entry, or when the dynamic linker loads it), run it, and report.

    Exits with the command's exit status (128 + N if signal N killed it)."""
    if not command:
        _say("[red]error:[/] give the command to run after --")
        raise typer.Exit(2)
    from micropatch.cli.admission import load_for_apply
    from micropatch.live import devrun

    try:
        admitted = load_for_apply(patch_file, trust, allow_unsigned)
    except MicropatchError as e:
        _say(f"[bold red]error:[/] {escape(e)}")
        raise typer.Exit(1) from None
    verified = admitted.described(str(patch_file))
    if verified is not None:  # on stderr, like every line of ours: stdout is the program's
        _say(f"[green]✓[/] {escape(verified)}")
    for warning in admitted.warnings:
        _say(f"[bold yellow]warning:[/] {escape(warning)}")
    if no_patch:
        _say(f"running {escape(command[0])} without {admitted.id} (--no-patch)")
    try:
        result = devrun.run(
            command,
            None if no_patch else admitted,
            keep_going=keep_going,
            say=lambda text: _say(escape(text)),
        )
    except MicropatchError as e:
        _say(f"[bold red]error:[/] {escape(e)}; the program was killed")
        raise typer.Exit(1) from None
    _report(result, admitted, no_patch)
    raise typer.Exit(1 if result.killed else result.exit.status)


def _report(result: devrun.DevRun, admitted: Admitted, no_patch: bool) -> None:
    patch = admitted.patch
    if result.error is not None:
        action = "the program was killed" if result.killed else "it ran unpatched (--keep-going)"
        _say(f"[bold red]error:[/] {patch.id} was not applied: {escape(result.error)}; {action}")
    elif result.applied is not None:
        a = result.applied
        sites = ", ".join(f"{addr:#x}" for s in a.states for addr in s.sites) or "?"
        _say(
            f"[green]applied[/] {patch.id} v{patch.version} to {escape(patch.target.module)} "
            f"{a.when}: "
            f"{len(patch.patchlets)} patchlet{'s' if len(patch.patchlets) != 1 else ''} "
            f"at {sites}; paused {a.outcome.paused * 1e3:.2f} ms"
        )
        for patch_id, blocked in result.blocked.items():
            if blocked is not None:
                _say(
                    f"blocked: {blocked} exploit attempt{'s' if blocked != 1 else ''} ({patch_id})"
                )
    elif not no_patch and result.module is not None:
        _say(
            f"module {escape(result.module)} was never loaded; nothing was applied "
            "(processes the program starts are not followed, only exec)"
        )
    exit_ = result.exit
    if result.killed:
        return
    if exit_.signal is not None:
        try:
            name = signal.Signals(exit_.signal).name
        except ValueError:
            name = f"signal {exit_.signal}"
        _say(f"the program was killed by {name} (exit status {exit_.status})")
    else:
        _say(f"the program exited with status {exit_.status}")
