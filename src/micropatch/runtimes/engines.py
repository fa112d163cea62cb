"""Which engine an operation goes to: the runtime is data in the patch.

apply and update take the admitted patch, whose `runtime` ("native" or
"cpython", from the artifact's payload) names the engine; remove takes a patch
id, and the engine is the one whose registry in the process records it (the
native caves, or the CPython interpreter page). `status`, `patched_pids` and
the --all selections read both registries, without stopping any process.
The CLI's transport calls these and never an engine by name.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from micropatch.errors import MicropatchError

if TYPE_CHECKING:
    from micropatch.live.selection import Selection
    from micropatch.process.select import Filters
    from micropatch.trust.admission import Admitted, AdmittedPython

    AnyAdmitted = Admitted | AdmittedPython

# The CPython engine's keywords, of those the transport passes (retries and the
# module cache are the native engine's).
_CPYTHON_TUNING = ("stop_timeout", "timeout")


def _cpython(tuning: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tuning.items() if k in _CPYTHON_TUNING}


def _native(tuning: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in tuning.items() if k != "timeout"}


def apply(patch: AnyAdmitted, pid: int, **tuning: Any) -> Any:
    """Apply `patch` to `pid` with its runtime's engine; that engine's Outcome."""
    if patch.runtime == "cpython":
        from micropatch.runtimes.cpython import engine

        return engine.apply(patch, pid, **_cpython(tuning))  # type: ignore[arg-type]
    from micropatch import live

    return live.apply(patch, pid, **_native(tuning))  # type: ignore[arg-type]


def update(patch: AnyAdmitted, pid: int, **tuning: Any) -> Any:
    """Replace the applied version of `patch.id` in `pid` by `patch`."""
    if patch.runtime == "cpython":
        from micropatch.runtimes.cpython import engine

        return engine.update(patch, pid, **_cpython(tuning))  # type: ignore[arg-type]
    from micropatch import live

    return live.update(patch, pid, **_native(tuning))  # type: ignore[arg-type]


def remove(patch_id: str, pid: int, **tuning: Any) -> Any:
    """Remove `patch_id` from `pid`, with the engine whose registry there records it
    (the native engine when none does: it says the patch is not applied)."""
    if _python_carries(pid, patch_id):
        from micropatch.runtimes.cpython import engine

        return engine.remove(patch_id, pid, **_cpython(tuning))
    from micropatch import live

    return live.remove(patch_id, pid, **_native(tuning))


def _python_carries(pid: int, patch_id: str) -> bool:
    from micropatch.runtimes.cpython import states

    try:
        return any(s.patch_id == patch_id for s in states.status(pid))
    except MicropatchError:
        return False  # the native engine reports the process as it finds it


def patched_pids() -> list[int]:
    """Processes with a registry of either runtime (patched now, or once)."""
    from micropatch.live.states import patched_pids as native
    from micropatch.runtimes.cpython.states import patched_pids as python

    return sorted(set(native()) | set(python()))


def status(pid: int) -> list[dict[str, Any]]:
    """The patches applied to `pid` by either runtime, as dicts (the agent's form);
    each says its `runtime`."""
    from micropatch.live.states import status as native
    from micropatch.runtimes.cpython.states import read

    states = [{**asdict(s), "runtime": "native"} for s in native(pid)]
    python, flight = read(pid)
    found = [asdict(s) for s in python]
    if flight is not None:
        for s in found:
            s["state"] = flight.state  # an operation in flight: `repair` settles it
        if not found:
            found.append(_in_flight(pid, flight.state))
    return states + found


def _in_flight(pid: int, state: str) -> dict[str, Any]:
    from micropatch.process.procfs import process_name
    from micropatch.runtimes.base import PatchState

    return asdict(PatchState(pid, process_name(pid), "?", "?", 0, "", 0.0, (), None, state))


def needs_repair(pid: int) -> bool:
    """Whether `repair(pid)` may have something to do, told without stopping the
    process where it can be (its native caves read as `status` reads them); a process
    with a CPython page is repaired in any case."""
    from micropatch.live.recovery import settled
    from micropatch.runtimes.cpython.page import MAPS_NAME

    try:
        with open(f"/proc/{pid}/maps") as f:
            if MAPS_NAME in f.read():
                return True
    except OSError:
        return True  # gone, or unreadable: `repair` says which
    return not settled(pid)


def repair(pid: int) -> list[str]:
    """Settle what killed patchers left in `pid`, in either runtime; what was done."""
    from micropatch import live
    from micropatch.runtimes.cpython import engine
    from micropatch.runtimes.cpython.page import MAPS_NAME

    done = list(live.repair(pid) or [])
    try:
        with open(f"/proc/{pid}/maps") as f:
            python = MAPS_NAME in f.read()
    except OSError:
        python = False
    if python:
        done += engine.repair(pid)
    return done


def select(verb: str, patch_id: str, patch: AnyAdmitted | None, filters: Filters) -> Selection:
    """The processes of `--all`: apply, those that may hold the patch's module and
    do not carry it; remove, those that carry it; update, those that carry an
    older version (of the patch's runtime; remove: of either)."""
    from micropatch.live.selection import Selection, for_apply, for_remove, for_update

    runtime = patch.runtime if patch is not None else None
    selections = []
    if runtime in (None, "native"):
        if verb == "apply":
            assert patch is not None
            selections.append(for_apply(patch.patch.target.module, patch_id, filters))
        elif verb == "remove":
            selections.append(for_remove(patch_id, filters))
        else:
            assert patch is not None
            selections.append(for_update(patch_id, patch.version, filters))
    if runtime in (None, "cpython"):
        selections.append(_python_selection(verb, patch_id, patch, filters))
    merged = Selection()
    seen: set[int] = set()
    for s in selections:
        merged.targets += [c for c in s.targets if c.pid not in seen]
        seen |= {c.pid for c in s.targets}
        merged.skipped += [c for c in s.skipped if c.pid not in seen]
        merged.gone += s.gone
        merged.unreadable += s.unreadable
    return merged


def _python_selection(
    verb: str, patch_id: str, patch: AnyAdmitted | None, filters: Filters
) -> Selection:
    """As `live.selection` selects native processes: apply, every interpreter of the
    patch's Python version that imported its module (read from its memory, so an
    interpreter without it is never touched) and does not carry it; remove and
    update, the interpreters whose page records the patch."""
    from micropatch.live.selection import scan, wanted
    from micropatch.runtimes.cpython import states
    from micropatch.runtimes.cpython.imports import has_module

    module = None
    if verb == "apply":
        from micropatch.trust.admission import AdmittedPython

        assert isinstance(patch, AdmittedPython)
        payload = patch.artifact.payload
        pids = states.interpreter_pids(payload.python.version)
        module = payload.module.name
    else:
        pids = states.patched_pids()

    def applied(pid: int) -> int | None:
        return next((s.version for s in states.status(pid) if s.patch_id == patch_id), None)

    def imported(pid: int) -> bool:
        assert module is not None
        return has_module(pid, module)

    return scan(
        pids,
        filters,
        applied,
        wanted(verb, patch.version if patch is not None else None),
        keep=imported if module else None,
    )
