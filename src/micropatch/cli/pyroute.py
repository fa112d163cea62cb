"""The CPython route of apply, update, remove, status and repair.

A dispatch on the patch's runtime, kept out of the commands' own code: a
CPython artifact (`"runtime": "cpython"` in its payload) or a patch id
carried by an interpreter page goes here; everything else stays native. The
agent does not carry CPython patches yet (phase 2): they always run
directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from micropatch.cli.options import err, fail, out, warn
from micropatch.errors import MicropatchError

if TYPE_CHECKING:
    from micropatch.process.select import Filters
    from micropatch.runtimes.base import Outcome, PatchState
    from micropatch.trust.policy import AdmittedPython

TimeoutOption = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        min=0.01,
        metavar="SECONDS",
        help="CPython patches: how long a thread may take to reach a point where Python code "
        "may run before the operation is cancelled, untouched (default 5).",
    ),
]


def is_python(path: Path) -> bool:
    """Whether a patch file is a CPython patch (artifact or source), read cheaply."""
    try:
        with open(path, "rb") as f:
            data = f.read(64 << 20)
    except OSError:
        return False
    text = data.lstrip()
    if text.startswith(b"{"):
        try:
            return bool(json.loads(data)["payload"].get("runtime") == "cpython")
        except (ValueError, KeyError, TypeError, AttributeError):
            return False
    import tomllib

    try:
        target = tomllib.loads(data.decode("utf-8")).get("target", {})
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(target, dict) and target.get("runtime") == "cpython"


def load(path: Path, trust: list[Path] | None, allow_unsigned: bool) -> AdmittedPython:
    from micropatch.cli.admission import report_admission
    from micropatch.trust.keys import trusted_keys
    from micropatch.trust.policy import AdmittedPython, admit_any, is_source, read_patch_file

    try:
        data = read_patch_file(path)
        keys = None
        if not is_source(data, str(path)):
            try:
                keys = trusted_keys(trust or ())
            except MicropatchError:
                if not allow_unsigned:
                    raise
        admitted = admit_any(data, name=str(path), keys=keys, allow_unsigned=allow_unsigned)
    except MicropatchError as e:
        raise fail(str(e)) from None
    assert isinstance(admitted, AdmittedPython)
    report_admission(path, admitted)
    return admitted


def run(
    verb: str,
    patch: AdmittedPython | None,
    patch_id: str,
    pids: list[int] | None,
    filters: Filters | None,
    *,
    dry_run: bool,
    lock_timeout: float | None,
    stop_timeout: float | None,
    timeout: float | None,
) -> None:
    """apply, update or remove a CPython patch on the named processes or on --all."""
    from micropatch.cli import running
    from micropatch.runtimes.cpython import engine

    tuning: dict[str, Any] = {}
    if stop_timeout is not None:
        tuning["stop_timeout"] = stop_timeout
    if timeout is not None:
        tuning["timeout"] = timeout

    def operation(pid: int) -> Outcome:
        if verb == "remove":
            return engine.remove(patch_id, pid, **tuning)
        assert patch is not None
        return (engine.apply if verb == "apply" else engine.update)(patch, pid, **tuning)

    if filters is None:
        running.run_each(verb, list(pids or []), operation, lock_timeout=lock_timeout)  # type: ignore[arg-type]
        return
    selection = _select(verb, patch, patch_id, filters)
    running.run_fleet(verb, selection, operation, dry_run=dry_run, lock_timeout=lock_timeout)  # type: ignore[arg-type]


def _select(verb: str, patch: AdmittedPython | None, patch_id: str, filters: Filters) -> Any:
    """The processes of `--all`, as `live.fleet` selects native ones: apply, every
    interpreter of the patch's Python version that does not carry it (whether it
    imported the module is checked inside each: not imported counts as skipped);
    remove and update, the interpreters whose page records the patch."""
    from micropatch.errors import ProcessExited, ProcessNotFound
    from micropatch.live.fleet import Candidate, Selection
    from micropatch.process.select import read_info
    from micropatch.runtimes.cpython import states

    if verb == "apply":
        assert patch is not None
        pids = states.interpreter_pids(patch.artifact.payload.python.version)
    else:
        pids = states.patched_pids()
    selection = Selection()
    for pid in pids:
        try:
            info = read_info(pid)
            if not filters.matches(info):
                continue
            applied = next((s.version for s in states.status(pid) if s.patch_id == patch_id), None)
        except (ProcessNotFound, ProcessExited):
            selection.gone += 1
            continue
        except MicropatchError as e:
            selection.unreadable.append((pid, e))
            continue
        candidate = Candidate(info, applied)
        wanted = {
            "apply": applied is None,
            "remove": applied is not None,
            "update": applied is not None and patch is not None and applied < patch.version,
        }[verb]
        (selection.targets if wanted else selection.skipped).append(candidate)
    return selection


def carriers(patch_id: str, pids: list[int] | None) -> list[int]:
    """Of `pids` (None: every process), those whose interpreter page records `patch_id`."""
    from micropatch.runtimes.cpython import states

    found = []
    for pid in pids if pids is not None else states.patched_pids():
        try:
            if any(s.patch_id == patch_id for s in states.status(pid)):
                found.append(pid)
        except MicropatchError:
            continue
    return found


def states_of(pids: list[int] | None) -> tuple[list[PatchState], list[int]]:
    """The CPython patches of `pids` (None: every process with a page), and the pids
    that could not be read (each reported)."""
    from micropatch.runtimes.cpython import states

    found: list[PatchState] = []
    unread: list[int] = []
    for pid in pids if pids is not None else states.patched_pids():
        try:
            patches, flight = states.read(pid)
        except MicropatchError as e:
            if pids is not None or type(e).__name__ not in ("ProcessNotFound", "ProcessExited"):
                unread.append(pid)
                err.print(f"[red]✗[/] pid {pid}: {e}")
            continue
        found += patches
        if flight is not None:
            warn(
                f"pid {pid}: a Python patch operation is {flight.state} (interrupted, or still "
                f"running); `micropatch repair --pid {pid}` settles it"
            )
    return found, unread


def rows(states: list[PatchState]) -> list[tuple[str, ...]]:
    """`micropatch status` rows: the module says `(cpython)`, sites are functions."""
    import datetime

    result: list[tuple[str, ...]] = []
    for s in states:
        since = datetime.datetime.fromtimestamp(s.applied_at).strftime("%Y-%m-%d %H:%M:%S")
        blocked = "-" if s.blocked is None else str(s.blocked)
        result.append((str(s.pid), s.process, f"{s.module} (cpython)", s.patch_id,
                       str(s.version), ",".join(s.sites), since, blocked))  # fmt: skip
    return result


def repair(pids: list[int]) -> int:
    """Settle interrupted Python operations; the number of failures."""
    from micropatch.runtimes.cpython import engine

    failures = 0
    for pid in pids:
        try:
            for line in engine.repair(pid):
                out.print(f"pid {pid}: {line}")
        except MicropatchError as e:
            failures += 1
            err.print(f"[red]✗[/] pid {pid}: {e}")
    return failures
