"""`micropatch apply|remove|update|status` through a running agent.

The client sends the artifact's bytes (the agent may see another /tmp); the
agent admits them with its own trust directory, runs the operation with its
module cache, and answers one result per process. A successful apply or remove
of a process pins that decision for the process's lifetime, so the agent's
reconciliation does not undo what an operator just did. Such patches, when the
store does not hold them, are listed in `agent status` as manual (`carried`).

Both runtimes go this way: the artifact says which engine applies and updates
it, and a process's registries which one removes it (`runtimes.engines`, as
for a direct run); the PythonPass honours the pins as the native passes do.
"""

from __future__ import annotations

import os
import time
from collections.abc import Container, Iterable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from micropatch.agent.events import Event
from micropatch.errors import AgentError, MicropatchError, to_wire
from micropatch.live.lock import waiting
from micropatch.process.procfs import start_time
from micropatch.process.select import Filters, read_info
from micropatch.runtimes import engines

if TYPE_CHECKING:
    from micropatch.agent.covered import Covered
    from micropatch.agent.service import Agent

VERBS = ("apply", "remove", "update")
TUNING = ("retries", "stop_timeout", "timeout")  # `timeout`: the CPython engine's


def run(agent: Agent, verb: str, args: dict[str, Any]) -> dict[str, Any]:
    """One of apply, remove, update on the processes named (`pids`) or selected
    (`filters`: exe, user, unit, cgroup lists, as `--all` takes them)."""
    if verb not in VERBS:
        raise AgentError(f"unknown verb {verb}")
    tuning = {k: args[k] for k in TUNING if args.get(k) is not None}
    answer: dict[str, Any] = {"results": [], "skipped": 0, "gone": 0, "unreadable": []}
    admitted = None
    if verb == "remove":
        patch_id = str(args["patch_id"])
    else:
        data, name = agent.decode_artifact(args)
        admitted = agent.store.admit_any_bytes(data, name)
        patch_id = admitted.id
        verified = admitted.described(name)
        if verified is not None:
            answer["verified"] = f"{verified} (by the agent)"
        answer["warnings"] = list(admitted.warnings)
    filters = args.get("filters")
    if filters is None:
        pids = [int(p) for p in args.get("pids") or []]
    else:
        f = Filters.of(filters.get("exe") or (), filters.get("user") or (),
                       filters.get("unit") or (), filters.get("cgroup") or ())  # fmt: skip
        selection = engines.select(verb, patch_id, admitted, f)
        pids = [c.pid for c in selection.targets]
        answer["skipped"] = len(selection.skipped)
        answer["gone"] = selection.gone
        answer["unreadable"] = [[pid, to_wire(e)] for pid, e in selection.unreadable]
    lock_timeout = args.get("lock_timeout")
    for pid in pids:
        try:
            with agent.ops, waiting(agent.config.lock_timeout if lock_timeout is None
                                         else float(lock_timeout)):  # fmt: skip
                if verb == "remove":
                    outcome, runtime, module = _remove(patch_id, pid, tuning)
                else:
                    assert admitted is not None
                    operation = engines.apply if verb == "apply" else engines.update
                    outcome = operation(admitted, pid, modules=agent.modules, **tuning)
                    runtime, module = admitted.runtime, admitted.patch.target.module
        except MicropatchError as e:
            answer["results"].append({"pid": pid, "error": to_wire(e)})
            continue
        answer["results"].append({"pid": pid, "outcome": asdict(outcome)})
        try:
            agent.state.pin(pid, start_time(pid), patch_id, verb != "remove")
            exe = read_info(pid).exe
        except MicropatchError:
            exe = None
        agent.report(_event(outcome, verb, exe, module, runtime))
    return answer


def _remove(patch_id: str, pid: int, tuning: dict[str, Any]) -> tuple[Any, str, str | None]:
    """Remove with the engine whose registry records the patch; the outcome, that
    runtime, and the module (a CPython patch's, from the interpreter's page)."""
    python = _python_module(pid, patch_id)
    outcome = engines.remove(patch_id, pid, **tuning)
    return outcome, "native" if python is None else "cpython", python


def _python_module(pid: int, patch_id: str) -> str | None:
    from micropatch.runtimes.cpython import states

    try:
        return next((s.module for s in states.status(pid) if s.patch_id == patch_id), None)
    except MicropatchError:
        return None  # the native engine says what it finds


def _event(outcome: Any, verb: str, exe: str | None, module: str | None, runtime: str) -> Event:
    """The event of an operator's operation (`outcome`: either engine's Outcome), as
    the passes report theirs."""
    pid, patch_id = outcome.pid, outcome.patch_id
    version = "" if outcome.version is None else f" v{outcome.version}"
    message = (
        f"{outcome.action} {patch_id}{version} in pid {pid} by the operator "
        f"(`micropatch {verb}`); paused {outcome.paused * 1e3:.2f} ms"
    )
    data: dict[str, Any] = {"sites": outcome.sites, "when": "operator"}
    if runtime == "cpython":
        message += f", in force after {outcome.waited * 1e3:.1f} ms"
        data.update(runtime="cpython", paused_ms=round(outcome.paused * 1e3, 3))
    return Event(outcome.action, time.time(), pid, exe, patch_id, outcome.version, module,
                 message, data)  # fmt: skip


def status(args: dict[str, Any]) -> dict[str, Any]:
    """What is applied to the processes named, or to every patched process, by
    either runtime (each row says its `runtime`)."""
    pids = [int(p) for p in args.get("pids") or []] or engines.patched_pids()
    rows, unread = [], []
    for pid in pids:
        try:
            rows += engines.status(pid)
        except MicropatchError as e:
            unread.append([pid, to_wire(e)])
    return {"states": rows, "unread": unread}


def carried(covered: Iterable[Covered], stored: Container[str]) -> list[dict[str, Any]]:
    """The patches processes carry that the store does not hold (applied by the
    operator, `micropatch apply` through the agent or directly), one entry per process
    and patch: what the agent has done to a process is in its status, whatever did it.

    Module (its name, as a patch names it; and its path) and title are read from the
    process's registry (None if it cannot be read)."""
    rows = []
    for c in sorted(covered, key=lambda c: c.pid):
        manual = {p: v for p, v in c.patches.items() if p not in stored}
        if not manual:
            continue
        try:  # either runtime's registry (a CPython patch's module is a dotted name)
            states = {s["patch_id"]: s for s in engines.status(c.pid)}
        except MicropatchError:
            states = {}
        for patch_id, version in sorted(manual.items()):
            s = states.get(patch_id)
            rows.append({
                "id": patch_id, "version": version, "pid": c.pid, "exe": c.exe,
                "module": os.path.basename(s["module"]) if s else None,
                "module_path": s["module"] if s else None, "title": s["title"] if s else None,
                "blocked": c.blocked.get(patch_id, 0),
            })  # fmt: skip
    return rows
