"""The `micropatch` command: thin commands over the layers below.

Each command imports what it uses when it runs (`status` never loads the
assembler), so the command starts fast; see benchmarks/peers.py, `startup`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from micropatch.cli import authoring, dev, tools
from micropatch.cli.options import (
    AllOption,
    AllowUnsignedOption,
    PidOption,
    RetriesOption,
    StopTimeoutOption,
    TrustOption,
    err,
    fail,
    out,
    stderr_console,
    stdout_console,
)
from micropatch.errors import MicropatchError, NotApplied

if TYPE_CHECKING:
    from micropatch import live
    from micropatch.trust.policy import Admitted

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
    if verbose:
        import logging

        logging.basicConfig(
            level=logging.DEBUG if verbose > 1 else logging.INFO,
            format="%(asctime)s %(name)s: %(message)s",
        )


def _load(path: Path, trust: list[Path] | None, allow_unsigned: bool) -> Admitted:
    from micropatch.cli.admission import load_for_apply

    try:
        return load_for_apply(path, trust, allow_unsigned)
    except MicropatchError as e:
        raise fail(str(e)) from None


def _retries(retries: int | None, stop_timeout: float | None) -> dict[str, Any]:
    """The engine's keyword arguments for the options given; its defaults for the others."""
    given = {"retries": retries, "stop_timeout": stop_timeout}
    return {name: value for name, value in given.items() if value is not None}


def _targets(pids: list[int] | None, all_: bool, find_all: Callable[[], list[int]]) -> list[int]:
    if bool(pids) == all_:
        raise fail("name the processes with --pid PID (repeatable), or use --all")
    return find_all() if all_ else list(pids or [])


def _run_each(
    verb: str,
    pids: list[int],
    operation: Callable[[int], live.Outcome],
    *,
    skip_not_applied: bool = False,
) -> None:
    """Run an operation on each pid: a line each, a progress bar for many; exit 1 on failure."""
    failures = 0
    done = 0
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        console=stderr_console(), transient=True, disable=len(pids) < 2,
    )  # fmt: skip
    with progress:
        task = progress.add_task(verb, total=len(pids))
        for pid in pids:
            try:
                outcome = operation(pid)
            except NotApplied as e:
                if not skip_not_applied:
                    failures += 1
                    err.print(f"[red]✗[/] pid {pid}: {e}")
            except MicropatchError as e:
                failures += 1
                err.print(f"[red]✗[/] pid {pid}: {e}")
            else:
                done += 1
                version = f" v{outcome.version}" if outcome.version is not None else ""
                out.print(
                    f"[green]✓[/] {outcome.action} {outcome.patch_id}{version} "
                    f"({outcome.sites} site{'s' if outcome.sites != 1 else ''}) in pid {pid}; "
                    f"paused {outcome.paused * 1e3:.2f} ms"
                    + (f" after {outcome.attempts} attempts" if outcome.attempts > 1 else ""),
                )
            progress.advance(task)
    if not pids:
        out.print(f"no process to {verb}")
    elif len(pids) > 1:
        out.print(f"{verb}: {done} done, {failures} failed, {len(pids) - done - failures} skipped")
    if failures:
        raise typer.Exit(1)


@app.command()
def apply(
    patch_file: Annotated[
        Path,
        typer.Argument(help="Signed artifact (.mpatch); a TOML source needs --allow-unsigned."),
    ],
    pid: PidOption = None,
    all_: AllOption = False,
    retries: RetriesOption = None,
    stop_timeout: StopTimeoutOption = None,
    trust: TrustOption = None,
    allow_unsigned: AllowUnsignedOption = False,
) -> None:
    """Apply a signed patch to running processes: every patchlet, or none."""
    from micropatch import live
    from micropatch.live.module import ModuleCache

    patch = _load(patch_file, trust, allow_unsigned)
    pids = _targets(pid, all_, lambda: live.pids_mapping(patch.patch.target.module))
    modules = ModuleCache()
    tuning = _retries(retries, stop_timeout)
    _run_each("apply", pids, lambda p: live.apply(patch, p, modules=modules, **tuning))


@app.command()
def remove(
    patch_id: Annotated[str, typer.Argument(help="Id of the applied patch.")],
    pid: PidOption = None,
    all_: AllOption = False,
    retries: RetriesOption = None,
    stop_timeout: StopTimeoutOption = None,
) -> None:
    """Remove an applied patch, restoring the original code."""
    from micropatch import live

    pids = _targets(pid, all_, live.patched_pids)
    _run_each(
        "remove",
        pids,
        lambda p: live.remove(patch_id, p, **_retries(retries, stop_timeout)),
        skip_not_applied=all_,
    )


@app.command()
def update(
    patch_file: Annotated[
        Path,
        typer.Argument(
            help="Signed artifact (.mpatch) of a newer version of an applied patch; a TOML "
            "source needs --allow-unsigned."
        ),
    ],
    pid: PidOption = None,
    all_: AllOption = False,
    retries: RetriesOption = None,
    stop_timeout: StopTimeoutOption = None,
    trust: TrustOption = None,
    allow_unsigned: AllowUnsignedOption = False,
) -> None:
    """Replace an applied patch by a newer version of it, in one stop of each process."""
    from micropatch import live
    from micropatch.live.module import ModuleCache

    patch = _load(patch_file, trust, allow_unsigned)
    pids = _targets(pid, all_, live.patched_pids)
    modules = ModuleCache()
    _run_each(
        "update",
        pids,
        lambda p: live.update(patch, p, modules=modules, **_retries(retries, stop_timeout)),
        skip_not_applied=all_,
    )


STATUS_COLUMNS = ("pid", "process", "module", "patch", "version", "sites", "since", "blocked")


@app.command()
def status(pid: PidOption = None) -> None:
    """Show what is applied: to the given processes, or to every patched process.

    On a terminal, a table; otherwise one tab-separated line per patch, for scripts.
    """
    import datetime

    from micropatch.live.states import patched_pids, status

    pids = pid or patched_pids()
    rows = []
    for p in pids:
        try:
            states = status(p)
        except MicropatchError as e:
            err.print(f"[red]✗[/] pid {p}: {e}")
            continue
        for s in states:
            since = datetime.datetime.fromtimestamp(s.applied_at).strftime("%Y-%m-%d %H:%M:%S")
            sites = ",".join(f"{a:#x}" for a in s.sites)
            blocked = "-" if s.blocked is None else str(s.blocked)
            rows.append(
                (str(s.pid), s.process, s.module, s.patch_id, str(s.version), sites, since, blocked)
            )
    if not rows:
        # Plain text, no markup: print() writes what out.print would, without loading rich.
        print("no micropatch applied" + (f" to pid {', '.join(map(str, pids))}" if pid else ""))
    elif out.is_terminal:
        from rich.table import Table

        table = Table(*STATUS_COLUMNS)
        for row in rows:
            table.add_row(*row)
        out.print(table)
    else:
        print("\t".join(STATUS_COLUMNS))
        for row in rows:
            print("\t".join(row))


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
tools.register(app)


def main() -> None:
    app()
