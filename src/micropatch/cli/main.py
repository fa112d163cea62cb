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
    CgroupOption,
    DryRunOption,
    ExeOption,
    LockTimeoutOption,
    PidOption,
    RetriesOption,
    StopTimeoutOption,
    TrustOption,
    UnitOption,
    UserOption,
    err,
    fail,
    out,
    stderr_console,
    stdout_console,
)
from micropatch.errors import MicropatchError, NotApplied

if TYPE_CHECKING:
    from micropatch import live
    from micropatch.live.fleet import Selection
    from micropatch.process.select import Filters
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


def _scope(
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


def _run_fleet(
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
        _run_each(
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


def _run_each(
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

    from micropatch.errors import AlreadyApplied, ProcessExited, ProcessNotFound
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
            except (NotApplied, AlreadyApplied) as e:
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


@app.command()
def apply(
    patch_file: Annotated[
        Path,
        typer.Argument(help="Signed artifact (.mpatch); a TOML source needs --allow-unsigned."),
    ],
    pid: PidOption = None,
    all_: AllOption = False,
    exe: ExeOption = None,
    user: UserOption = None,
    unit: UnitOption = None,
    cgroup: CgroupOption = None,
    dry_run: DryRunOption = False,
    retries: RetriesOption = None,
    lock_timeout: LockTimeoutOption = None,
    stop_timeout: StopTimeoutOption = None,
    trust: TrustOption = None,
    allow_unsigned: AllowUnsignedOption = False,
) -> None:
    """Apply a signed patch to running processes: every patchlet, or none.

    --all: every process that maps the patch's module and does not carry the patch yet."""
    from micropatch import live
    from micropatch.live.module import ModuleCache

    filters = _scope(pid, all_, exe, user, unit, cgroup, dry_run)
    patch = _load(patch_file, trust, allow_unsigned)
    modules = ModuleCache()

    def operation(p: int) -> live.Outcome:
        return live.apply(patch, p, modules=modules, **_retries(retries, stop_timeout))

    if filters is None:
        _run_each("apply", list(pid or []), operation, lock_timeout=lock_timeout)
        return
    from micropatch.live import fleet

    selection = fleet.for_apply(patch.patch.target.module, patch.id, filters)
    _run_fleet("apply", selection, operation, dry_run=dry_run, lock_timeout=lock_timeout)


@app.command()
def remove(
    patch_id: Annotated[str, typer.Argument(help="Id of the applied patch.")],
    pid: PidOption = None,
    all_: AllOption = False,
    exe: ExeOption = None,
    user: UserOption = None,
    unit: UnitOption = None,
    cgroup: CgroupOption = None,
    dry_run: DryRunOption = False,
    retries: RetriesOption = None,
    lock_timeout: LockTimeoutOption = None,
    stop_timeout: StopTimeoutOption = None,
) -> None:
    """Remove an applied patch, restoring the original code.

    --all: every process that carries the patch, found without stopping any."""
    from micropatch import live

    filters = _scope(pid, all_, exe, user, unit, cgroup, dry_run)

    def operation(p: int) -> live.Outcome:
        return live.remove(patch_id, p, **_retries(retries, stop_timeout))

    if filters is None:
        _run_each("remove", list(pid or []), operation, lock_timeout=lock_timeout)
        return
    from micropatch.live import fleet

    selection = fleet.for_remove(patch_id, filters)
    _run_fleet("remove", selection, operation, dry_run=dry_run, lock_timeout=lock_timeout)


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
    exe: ExeOption = None,
    user: UserOption = None,
    unit: UnitOption = None,
    cgroup: CgroupOption = None,
    dry_run: DryRunOption = False,
    retries: RetriesOption = None,
    lock_timeout: LockTimeoutOption = None,
    stop_timeout: StopTimeoutOption = None,
    trust: TrustOption = None,
    allow_unsigned: AllowUnsignedOption = False,
) -> None:
    """Replace an applied patch by a newer version of it, in one stop of each process.

    --all: every process that carries an older version, found without stopping any."""
    from micropatch import live
    from micropatch.live.module import ModuleCache

    filters = _scope(pid, all_, exe, user, unit, cgroup, dry_run)
    patch = _load(patch_file, trust, allow_unsigned)
    modules = ModuleCache()

    def operation(p: int) -> live.Outcome:
        try:
            return live.update(patch, p, modules=modules, **_retries(retries, stop_timeout))
        except NotApplied as e:
            e.within(pid=p).hint(
                f"; to patch it for the first time, use `micropatch apply {patch_file} --pid {p}`"
            )
            raise

    if filters is None:
        _run_each("update", list(pid or []), operation, lock_timeout=lock_timeout)
        return
    from micropatch.live import fleet

    selection = fleet.for_update(patch.id, patch.version, filters)
    _run_fleet("update", selection, operation, dry_run=dry_run, lock_timeout=lock_timeout)


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
    unread = []
    for p in pids:
        try:
            states = status(p)
        except MicropatchError as e:
            unread.append(p)
            err.print(f"[red]✗[/] pid {p}: {e}")
            continue
        for s in states:
            since = datetime.datetime.fromtimestamp(s.applied_at).strftime("%Y-%m-%d %H:%M:%S")
            sites = ",".join(f"{a:#x}" for a in s.sites)
            blocked = "-" if s.blocked is None else str(s.blocked)
            rows.append(
                (str(s.pid), s.process, s.module, s.patch_id, _version(s), sites, since, blocked)
            )
    read = [p for p in pids if p not in unread]
    if not rows and (read or not pid):
        # Plain text, no markup: print() writes what out.print would, without loading rich.
        print("no micropatch applied" + (f" to pid {', '.join(map(str, read))}" if pid else ""))
    elif rows and out.is_terminal:
        from rich.table import Table

        table = Table(*STATUS_COLUMNS)
        for row in rows:
            table.add_row(*row)
        out.print(table)
    elif rows:
        print("\t".join(STATUS_COLUMNS))
        for row in rows:
            print("\t".join(row))
    if pid and unread:
        raise typer.Exit(1)  # a process named on the command line could not be read


def _version(state: live.PatchState) -> str:
    if state.state == "applied":
        return str(state.version)
    return f"{state.version} ({state.state}: interrupted; `micropatch repair --pid {state.pid}`)"


@app.command()
def repair(pid: PidOption = None, all_: AllOption = False) -> None:
    """Complete or roll back an operation whose patcher was killed midway.

    Every apply, remove and update does this first by itself; `status` shows
    such a process with the patch's state (applying, removing)."""
    from micropatch import live

    if bool(pid) == all_:
        raise fail("name the processes with --pid PID (repeatable), or use --all")
    pids = live.patched_pids() if all_ else list(pid or [])
    failures = 0
    for p in pids:
        try:
            done = live.repair(p)
        except MicropatchError as e:
            failures += 1
            err.print(f"[red]✗[/] pid {p}: {e}")
            continue
        for line in done or ["nothing to repair"]:
            out.print(f"pid {p}: {line}")
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
tools.register(app)


def main() -> None:
    app()
