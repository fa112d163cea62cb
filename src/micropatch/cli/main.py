"""The `micropatch` command: thin commands over the layers below.

Each command imports what it uses when it runs (`status` never loads the
assembler), so the command starts fast; see benchmarks/peers.py, `startup`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from micropatch.cli import agent, answers, authoring, dev, pyroute, routing, running, server, tools
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
    stdout_console,
)
from micropatch.errors import MicropatchError, NotApplied

if TYPE_CHECKING:
    from micropatch import live

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
    timeout: pyroute.TimeoutOption = None,
) -> None:
    """Apply a signed patch to running processes: every patchlet, or none.

    --all: every process that maps the patch's module and does not carry the patch yet
    (a CPython patch: every interpreter of its Python version that imported the module).
    Through the host agent when one runs (docs/agent.md); CPython patches always directly."""
    filters = running.scope(pid, all_, exe, user, unit, cgroup, dry_run)
    if pyroute.is_python(patch_file):
        admitted = pyroute.load(patch_file, trust, allow_unsigned)
        pyroute.run("apply", admitted, admitted.id, pid, filters, dry_run=dry_run,
                    lock_timeout=lock_timeout, stop_timeout=stop_timeout, timeout=timeout)
        return
    client = routing.agent(direct=bool(trust or allow_unsigned or dry_run))
    if client is not None:
        arguments = _remote(pid, all_, exe, user, unit, cgroup, retries, stop_timeout, lock_timeout)
        routing.run(client, "apply", arguments, artifact=patch_file)
        return
    from micropatch import live
    from micropatch.live.module import ModuleCache

    patch = running.load(patch_file, trust, allow_unsigned)
    modules = ModuleCache()

    def operation(p: int) -> live.Outcome:
        return live.apply(patch, p, modules=modules, **running.tuning(retries, stop_timeout))

    if filters is None:
        running.run_each("apply", list(pid or []), operation, lock_timeout=lock_timeout)
        return
    from micropatch.live import fleet

    selection = fleet.for_apply(patch.patch.target.module, patch.id, filters)
    running.run_fleet("apply", selection, operation, dry_run=dry_run, lock_timeout=lock_timeout)


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
    timeout: pyroute.TimeoutOption = None,
) -> None:
    """Remove an applied patch, restoring the original code.

    --all: every process that carries the patch, found without stopping any.
    Through the host agent when one runs (docs/agent.md); CPython patches always directly."""
    filters = running.scope(pid, all_, exe, user, unit, cgroup, dry_run)
    if pyroute.carriers(patch_id, list(pid) if pid else None):
        pyroute.run("remove", None, patch_id, pid, filters, dry_run=dry_run,
                    lock_timeout=lock_timeout, stop_timeout=stop_timeout, timeout=timeout)
        return
    client = routing.agent(direct=dry_run)
    if client is not None:
        arguments = _remote(pid, all_, exe, user, unit, cgroup, retries, stop_timeout, lock_timeout)
        routing.run(client, "remove", {**arguments, "patch_id": patch_id})
        return
    from micropatch import live


    def operation(p: int) -> live.Outcome:
        return live.remove(patch_id, p, **running.tuning(retries, stop_timeout))

    if filters is None:
        running.run_each("remove", list(pid or []), operation, lock_timeout=lock_timeout)
        return
    from micropatch.live import fleet

    selection = fleet.for_remove(patch_id, filters)
    running.run_fleet("remove", selection, operation, dry_run=dry_run, lock_timeout=lock_timeout)


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
    timeout: pyroute.TimeoutOption = None,
) -> None:
    """Replace an applied patch by a newer version of it, in one stop of each process.

    --all: every process that carries an older version, found without stopping any.
    Through the host agent when one runs (docs/agent.md); CPython patches always directly."""
    filters = running.scope(pid, all_, exe, user, unit, cgroup, dry_run)
    if pyroute.is_python(patch_file):
        admitted = pyroute.load(patch_file, trust, allow_unsigned)
        pyroute.run("update", admitted, admitted.id, pid, filters, dry_run=dry_run,
                    lock_timeout=lock_timeout, stop_timeout=stop_timeout, timeout=timeout)
        return
    client = routing.agent(direct=bool(trust or allow_unsigned or dry_run))
    if client is not None:
        arguments = _remote(pid, all_, exe, user, unit, cgroup, retries, stop_timeout, lock_timeout)
        routing.run(client, "update", arguments, artifact=patch_file)
        return
    from micropatch import live
    from micropatch.live.module import ModuleCache

    patch = running.load(patch_file, trust, allow_unsigned)
    modules = ModuleCache()

    def operation(p: int) -> live.Outcome:
        try:
            return live.update(patch, p, modules=modules, **running.tuning(retries, stop_timeout))
        except NotApplied as e:
            e.within(pid=p).hint(
                f"; to patch it for the first time, use `micropatch apply {patch_file} --pid {p}`"
            )
            raise

    if filters is None:
        running.run_each("update", list(pid or []), operation, lock_timeout=lock_timeout)
        return
    from micropatch.live import fleet

    selection = fleet.for_update(patch.id, patch.version, filters)
    running.run_fleet("update", selection, operation, dry_run=dry_run, lock_timeout=lock_timeout)


def _remote(
    pid: list[int] | None,
    all_: bool,
    exe: list[str] | None,
    user: list[str] | None,
    unit: list[str] | None,
    cgroup: list[str] | None,
    retries: int | None,
    stop_timeout: float | None,
    lock_timeout: float | None,
) -> dict[str, object]:
    """The request arguments of apply/remove/update for the agent."""
    return {
        "pids": list(pid or []),
        "filters": routing.filters(all_, exe, user, unit, cgroup),
        "retries": retries,
        "stop_timeout": stop_timeout,
        "lock_timeout": lock_timeout,
    }


STATUS_COLUMNS = ("pid", "process", "module", "patch", "version", "sites", "since", "blocked")


@app.command()
def status(pid: PidOption = None) -> None:
    """Show what is applied: to the given processes, or to every patched process.

    On a terminal, a table; otherwise one tab-separated line per patch, for scripts.
    Read through the host agent when one runs.
    """
    import datetime

    client = routing.agent()
    if client is not None:
        found, unread_fields = routing.status(client, pid)
        states: list[live.PatchState | _State] = [_State(**s) for s in found]
        # A process that exits between the scan and the read is no error, unless named.
        unread_fields = [
            (p, f) for p, f in unread_fields if pid or f.get("error") not in answers.GONE
        ]
        unread = [p for p, _ in unread_fields]
        for p, fields in unread_fields:
            err.print(f"[red]✗[/] pid {p}: {fields.get('message', '')}")
        pids = pid or sorted({s.pid for s in states} | set(unread))
    else:
        from micropatch.live.states import patched_pids
        from micropatch.live.states import status as read_status
        from micropatch.runtimes.cpython.states import patched_pids as pyroute_pids

        pids = pid or sorted(set(patched_pids()) | set(pyroute_pids()))
        states, unread = [], []
        for p in pids:
            try:
                states += read_status(p)
            except MicropatchError as e:
                if not pid and type(e).__name__ in answers.GONE:
                    continue  # exited since the scan
                unread.append(p)
                err.print(f"[red]✗[/] pid {p}: {e}")
    python_states, python_unread = pyroute.states_of(list(pid) if pid else None)
    unread += [p for p in python_unread if p not in unread]
    rows = pyroute.rows(python_states)
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


@dataclasses.dataclass(frozen=True)
class _State:
    """A live.PatchState as the agent sends it (without importing live.states)."""

    pid: int
    process: str
    module: str
    patch_id: str
    version: int
    title: str
    applied_at: float
    sites: list[int]
    cave: int
    blocked: int | None
    state: str = "applied"
    counters: tuple[int, ...] = ()


def _version(state: live.PatchState | _State) -> str:
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
    from micropatch.runtimes.cpython.states import patched_pids as python_pids

    pids = live.patched_pids() if all_ else list(pid or [])
    python = python_pids()
    failures = pyroute.repair(python if all_ else [p for p in pids if p in python])
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
app.add_typer(agent.app, name="agent")
tools.register(app)
server.register(app)


def main() -> None:
    app()
