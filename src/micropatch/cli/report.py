"""What apply, remove and update print: one line per process as it is done, a
summary, the exit status; or, with --dry-run, the processes they would touch.

The same for a run through the agent and a direct one (`transport.Run`).
"""

from __future__ import annotations

import sys

from micropatch.cli import say
from micropatch.errors import (
    AlreadyApplied,
    MicropatchError,
    ModuleNotImported,
    NotApplied,
    ProcessExited,
    ProcessNotFound,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, Sequence
    from typing import Any

    from micropatch.cli.transport import Result, Run

GONE = (ProcessNotFound, ProcessExited)  # with --all: exited since the scan
# with --all: its patches changed since the scan; a CPython interpreter in scope that
# has not imported the patch's module (checked inside it: docs/python-patches.md)
SKIPPED = (NotApplied, AlreadyApplied, ModuleNotImported)


def show(
    verb: str,
    run: Run,
    *,
    selected: bool,
    hint: Callable[[int, MicropatchError], None] | None = None,
) -> int:
    """Print the run as it goes; its exit status. `selected`: --all (a process gone or
    changed since the scan is counted, not failed). `hint`: adds advice to an error."""
    if run.verified:
        say.ok(run.verified)
    for warning in run.warnings:
        say.warning(warning)
    failures, skipped, gone = len(run.unreadable), run.skipped, run.gone
    for pid, e in run.unreadable:
        say.failed(f"pid {pid}: cannot read its patches: {e}")
    if run.candidates is not None:
        return _dry_run(verb, run)
    done = 0
    for pid, result in _progress(verb, run):
        if isinstance(result, MicropatchError):
            if hint is not None:
                hint(pid, result)
            if selected and isinstance(result, GONE):
                gone += 1
                say.skipped(f"pid {pid}: gone ({result})")
            elif selected and isinstance(result, SKIPPED):
                skipped += 1
                say.skipped(f"pid {pid}: skipped ({result})")
            else:
                failures += 1
                say.failed(f"pid {pid}: {result}")
            continue
        done += 1
        for line in result.get("recovered") or ():
            say.plain(f"pid {pid}: first {line}, left by an interrupted micropatch")
        say.ok(outcome_line(result) + (" (through the agent)" if run.agent else ""))
    if not done + failures + skipped + gone and not selected:
        say.plain(f"no process to {verb}")
    if selected or done + failures > 1:
        say.plain(f"{verb}: {done} done, {failures} failed, {skipped} skipped, {gone} gone")
    return 1 if failures else 0


def outcome_line(o: dict[str, Any]) -> str:
    """`applied fix v2 (1 site) in pid 42; paused 0.91 ms` from live.Outcome's fields; a
    CPython patch's (runtimes.base.Outcome: `waited`) counts functions, and says when
    it was in force."""
    version = f" v{o['version']}" if o["version"] is not None else ""
    python = "waited" in o
    what = "function" if python else "site"
    in_force = f"in force after {o['waited'] * 1e3:.1f} ms, " if python else ""
    return (
        f"{o['action']} {o['patch_id']}{version} "
        f"({o['sites']} {what}{'s' if o['sites'] != 1 else ''}) in pid {o['pid']}; "
        f"{in_force}paused {o['paused'] * 1e3:.2f} ms"
        + (f" after {o['attempts']} attempts" if o["attempts"] > 1 else "")
    )


def _progress(verb: str, run: Run) -> Iterator[Result]:
    """The results, under a progress bar on a terminal when there are several."""
    if run.total is None or run.total < 2 or not sys.stderr.isatty():
        yield from run.results
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from micropatch.cli.options import stderr_console

    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        console=stderr_console(), transient=True,
    )  # fmt: skip
    with progress:
        task = progress.add_task(verb, total=run.total)
        for result in run.results:
            yield result
            progress.advance(task)


def _dry_run(verb: str, run: Run) -> int:
    assert run.candidates is not None
    rows = [
        (str(c.pid), c.info.exe or "?", c.info.user, c.info.unit or "-",
         "-" if c.applied is None else str(c.applied))
        for c in run.candidates
    ]  # fmt: skip
    columns = ("pid", "exe", "user", "unit", "applied")
    table(columns, rows, title=f"{verb} would touch")
    say.plain(
        f"{verb} --dry-run: would touch {len(rows)} process{'es' if len(rows) != 1 else ''}, "
        f"{run.skipped} skipped, {run.gone} gone, {len(run.unreadable)} unreadable; "
        "nothing was changed"
    )
    return 1 if run.unreadable else 0


def table(
    columns: tuple[str, ...], rows: Sequence[tuple[str, ...]], title: str | None = None
) -> None:
    """A table on a terminal; otherwise a header and one tab-separated line per row."""
    if not rows:
        return
    if sys.stdout.isatty():
        from rich.markup import escape
        from rich.table import Table

        from micropatch.cli.options import stdout_console

        shown = Table(*columns, title=title)
        for row in rows:
            shown.add_row(*map(escape, row))
        stdout_console().print(shown)
        return
    print("\t".join(columns))
    for row in rows:
        print("\t".join(row))
