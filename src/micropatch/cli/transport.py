"""How apply, remove and update reach the processes: through the host agent when
one answers on its socket, else directly through the engine in this process.

Both give back a `Run` of the same shape: what admission said, what a scan of
--all found, and one result per process (the outcome as the agent sends it,
or the error as the class that was raised: errors cross the agent's socket
with their type and fields, `errors.from_wire`). The commands print a `Run`
one way whichever transport made it (`report.py`).

The agent is skipped with MICROPATCH_NO_AGENT=1, and with --trust,
--allow-unsigned or --dry-run: the operator's own choices about admission and
scope, which the agent (with its trust directory) does not take.
"""

from __future__ import annotations

import os

from micropatch.errors import MicropatchError, from_wire

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Iterator
    from typing import Any

    from micropatch.agent.client import AgentClient
    from micropatch.cli.scope import Scope
    from micropatch.live.selection import Candidate

    Result = tuple[int, "dict[str, Any] | MicropatchError"]

NO_AGENT_VARIABLE = "MICROPATCH_NO_AGENT"


class Run:
    """What one apply/remove/update did: `results` are (pid, outcome or error),
    produced as the operations run when the run is direct (`total` is then how
    many there will be)."""

    __slots__ = ("agent", "candidates", "gone", "results", "skipped", "total", "unreadable",
                 "verified", "warnings")  # fmt: skip

    def __init__(self, results: Iterable[Result], *, total: int | None = None) -> None:
        self.results = results
        self.total = total
        self.verified: str | None = None  # what admission verified, for the first line
        self.warnings: list[str] = []
        self.unreadable: list[tuple[int, MicropatchError]] = []  # --all: could not be read
        self.skipped = 0  # --all: in scope, nothing to do
        self.gone = 0  # --all: exited during the scan
        self.candidates: list[Candidate] | None = None  # --dry-run: what it would touch
        self.agent = False


def agent(*, direct: bool = False) -> AgentClient | None:
    """The running agent to go through, or None to run directly."""
    if direct or os.environ.get(NO_AGENT_VARIABLE):
        return None
    from micropatch.agent.client import running

    return running()


def through_agent(
    client: AgentClient, verb: str, subject: str, scope: Scope, values: dict[str, Any]
) -> Run:
    """Send one apply/remove/update to the agent; its answer as a Run."""
    from micropatch.agent.client import artifact_arguments

    arguments: dict[str, Any] = {
        "pids": scope.pids,
        "filters": scope.filters,
        **{k: values.get(k) for k in ("retries", "stop_timeout", "lock_timeout", "timeout")},
    }
    if verb == "remove":
        arguments["patch_id"] = subject
    else:
        arguments.update(artifact_arguments(subject))
    answer = client.call(verb, **arguments)
    run = Run([
        (r["pid"], r["outcome"] if "outcome" in r else from_wire(r["error"]))
        for r in answer["results"]
    ])  # fmt: skip
    run.agent = True
    run.verified = answer.get("verified")
    run.warnings = list(answer.get("warnings") or ())
    run.unreadable = [(pid, from_wire(fields)) for pid, fields in answer["unreadable"]]
    run.skipped, run.gone = answer["skipped"], answer["gone"]
    return run


def directly(
    verb: str,
    subject: str,
    scope: Scope,
    values: dict[str, Any],
    on_wait: Callable[[str], None],
) -> Run:
    """Admit the patch here and run its runtime's engine on each process, one after
    the other (`runtimes.engines` chooses the engine: the runtime is data in the
    artifact, or, for remove, in the process's registry)."""
    from micropatch.cli.scope import tuning
    from micropatch.runtimes import engines

    engine: dict[str, Any] = tuning(values)
    patch_id, admitted = subject, None
    if verb != "remove":
        from micropatch.cli.admission import load_any_for_apply

        admitted = load_any_for_apply(subject, values["trust"], values["allow_unsigned"])
        patch_id = admitted.id
        if admitted.runtime == "native":
            from micropatch.live.mapped import ModuleCache

            engine["modules"] = ModuleCache()

    def operation(pid: int) -> Any:
        if verb == "remove":
            return engines.remove(patch_id, pid, **engine)
        assert admitted is not None
        return (engines.apply if verb == "apply" else engines.update)(admitted, pid, **engine)

    selection = None
    pids = scope.pids
    if scope.filters is not None:
        from micropatch.process.select import Filters

        f = scope.filters
        filters = Filters.of(f["exe"], f["user"], f["unit"], f["cgroup"])
        selection = engines.select(verb, patch_id, admitted, filters)
        pids = [c.pid for c in selection.targets]
    each = _each(pids, operation, values["lock_timeout"], on_wait, values.get("watchdog"))
    run = Run(each, total=len(pids))
    if admitted is not None:
        run.verified = admitted.described(subject)
        run.warnings = list(admitted.warnings)
    if selection is not None:
        run.unreadable = selection.unreadable
        run.skipped, run.gone = len(selection.skipped), selection.gone
        if scope.dry_run:
            run.candidates = selection.targets
    return run


def _each(
    pids: list[int],
    operation: Callable[[int], Any],
    lock_timeout: float | None,
    on_wait: Callable[[str], None],
    limit: float | None,
) -> Iterator[Result]:
    """Each operation's result, with this process's stops watched (process/watchdog.py)."""
    from dataclasses import asdict

    from micropatch.live.lock import waiting
    from micropatch.process.watchdog import DEFAULT_LIMIT, watching

    if not pids:
        return
    with watching(limit or DEFAULT_LIMIT), waiting(lock_timeout, on_wait=on_wait):
        for pid in pids:
            try:
                yield pid, asdict(operation(pid))
            except MicropatchError as e:
                yield pid, e
