"""What apply, remove, update and repair share: loading the patch, choosing the
processes (--pid, or --all with its filters), running the operation on each with
a line per process and a summary, and what the engine is told (--retries,
--stop-timeout, --lock-timeout)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from micropatch.cli.options import err, fail, out, stderr_console
from micropatch.errors import MicropatchError, NotApplied

if TYPE_CHECKING:
    from micropatch import live
    from micropatch.live.fleet import Selection
    from micropatch.process.select import Filters
    from micropatch.trust.policy import Admitted


def load(path: Path, trust: list[Path] | None, allow_unsigned: bool) -> Admitted:
    from micropatch.cli.admission import load_for_apply

    try:
        return load_for_apply(path, trust, allow_unsigned)
    except MicropatchError as e:
        raise fail(str(e)) from None


def tuning(retries: int | None, stop_timeout: float | None) -> dict[str, Any]:
    """The engine's keyword arguments for the options given; its defaults for the others."""
    given = {"retries": retries, "stop_timeout": stop_timeout}
    return {name: value for name, value in given.items() if value is not None}


def scope(
    pids: list[int] | None,
    all_: bool,
    exe: list[str] | None,
    user: list[str] | None,
    unit: list[str] | None,
    cgroup: list[str] | None,
    dry_run: bool,
) -> Filters | None:
    """The filters of `--all`, or None when processes are named with --pid."""
    if bool(pids) == all_:
        raise fail("name the processes with --pid PID (repeatable), or use --all")
    if not all_:
        if exe or user or unit or cgroup or dry_run:
            raise fail(
                "--exe, --user, --unit, --cgroup and --dry-run choose among --all; "
                "use them with --all instead of --pid"
            )
        return None
    from micropatch.process.select import Filters

    try:
        return Filters.of(exe or (), user or (), unit or (), cgroup or ())
    except MicropatchError as e:
        raise fail(str(e)) from None


def run_fleet(
    verb: str,
    selection: Selection,
    operation: Callable[[int], live.Outcome],
    *,
    dry_run: bool,
    lock_timeout: float | None,
) -> None:
    """Run an operation on the processes a scan selected, or only list them (--dry-run)."""
    from rich.markup import escape

    for pid, e in selection.unreadable:
        err.print(f"[red]✗[/] pid {pid}: cannot read its patches: {escape(str(e))}")
    if not dry_run:
        run_each(
            verb,
            [c.pid for c in selection.targets],
            operation,
            lock_timeout=lock_timeout,
            fleet=True,
            skipped=len(selection.skipped),
            gone=selection.gone,
            failures=len(selection.unreadable),
        )
        return
    rows = [
        (
            str(c.pid),
            c.info.exe or "?",
            c.info.user,
            c.info.unit or "-",
            "-" if c.applied is None else str(c.applied),
        )
        for c in selection.targets
    ]
    columns = ("pid", "exe", "user", "unit", "applied")
    if rows and out.is_terminal:
        from rich.table import Table

        table = Table(*columns, title=f"{verb} would touch")
        for row in rows:
            table.add_row(*map(escape, row))
        out.print(table)
    elif rows:
        print("\t".join(columns))
        for row in rows:
            print("\t".join(row))
    print(
        f"{verb} --dry-run: would touch {len(rows)} process{'es' if len(rows) != 1 else ''}, "
        f"{len(selection.skipped)} skipped, {selection.gone} gone, "
        f"{len(selection.unreadable)} unreadable; nothing was changed"
    )
    if selection.unreadable:
        raise typer.Exit(1)


def run_each(
    verb: str,
    pids: list[int],
    operation: Callable[[int], live.Outcome],
    *,
    lock_timeout: float | None,
    fleet: bool = False,
    skipped: int = 0,
    gone: int = 0,
    failures: int = 0,
) -> None:
    """Run an operation on each pid: a line each, a progress bar for many; exit 1 on failure.

    `fleet` (--all): a process that exited meanwhile is counted as gone, and one whose
    patches changed since the scan (not applied any more, already applied) as skipped."""
    done = 0
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from micropatch.errors import (
        AlreadyApplied,
        ModuleNotImported,
        ProcessExited,
        ProcessNotFound,
    )
    from micropatch.live.lock import waiting

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        console=stderr_console(), transient=True, disable=len(pids) < 2,
    )  # fmt: skip

    def waits(message: str) -> None:
        progress.console.print(f"[yellow]…[/] {escape(message)}")

    with progress, waiting(lock_timeout, on_wait=waits):
        task = progress.add_task(verb, total=len(pids))
        for pid in pids:
            try:
                outcome = operation(pid)
            except (ProcessNotFound, ProcessExited) as e:
                if not fleet:
                    failures += 1
                    err.print(f"[red]✗[/] pid {pid}: {escape(str(e))}")
                else:
                    gone += 1
                    err.print(f"[dim]· pid {pid}: gone ({escape(str(e))})[/]")
            except (NotApplied, AlreadyApplied, ModuleNotImported) as e:
                if not fleet:
                    failures += 1
                    err.print(f"[red]✗[/] pid {pid}: {escape(str(e))}")
                else:
                    skipped += 1
                    err.print(f"[dim]· pid {pid}: skipped ({escape(str(e))})[/]")
            except MicropatchError as e:
                failures += 1
                err.print(f"[red]✗[/] pid {pid}: {escape(str(e))}")
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
    if not pids and not fleet:
        out.print(f"no process to {verb}")
    if fleet or len(pids) > 1:
        out.print(f"{verb}: {done} done, {failures} failed, {skipped} skipped, {gone} gone")
    if failures:
        raise typer.Exit(1)
