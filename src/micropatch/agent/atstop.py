"""Patching a process the agent holds, or one it reaches late, and saying so.

`StopPatcher.held` applies the wanted patches inside a stop the caller's thread
holds (an exec event or a system call exit stop: `live.engine.holding` /
`apply_held`); `StopPatcher.live` applies them to a running process
(`live.engine.apply`, a stop of its own), for the late paths. Each result is an
event: `applied` (with `when`: exec, load, late) or `failed` with the error's
fields.

A copy of a module found under another file name than the patch's
`[target] module` (a wheel's renamed copy, a hard link) is patched under the
name the process maps it by (`named_for`): the engine finds the mapping by
name, then checks its identity (build-id, SHA-256) as always.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from typing import Any

from micropatch.agent.events import Event, EventSink
from micropatch.agent.files import ModuleFile
from micropatch.errors import AlreadyApplied, MicropatchError
from micropatch.live.engine import apply, apply_held, holding
from micropatch.live.mapped import ModuleCache
from micropatch.process.select import ProcessInfo
from micropatch.trust.admission import Admitted

log = logging.getLogger(__name__)

Work = Iterable[tuple[ModuleFile, list[Admitted]]]


def named_for(patch: Admitted, name: str) -> Admitted:
    """`patch` with its target's module named `name` (the same patch otherwise)."""
    target = patch.patch.target
    if target.module == name:
        return patch
    renamed = _replaced(patch.patch, target=_replaced(target, module=name))
    return dataclasses.replace(patch, patch=renamed)


def _replaced(record: Any, **changes: Any) -> Any:
    """A copy of a patch's record with `changes`: a named tuple as a verified artifact
    records it (`trust.recorded`), or the model of an unsigned source."""
    if hasattr(record, "_replace"):
        return record._replace(**changes)
    return record.model_copy(update=changes)


class StopPatcher:
    """Applies patches for the new-process part, with events (see the module doc)."""

    def __init__(self, report: EventSink, modules: ModuleCache) -> None:
        self.report = report
        self.modules = modules

    def held(
        self, pid: int, held: list[int], info: ProcessInfo, work: Work, when: str,
        names: dict[tuple[int, int], str],
    ) -> tuple[int, int]:  # fmt: skip
        """Stop the rest of the process and apply, the threads `held` staying ours;
        `names`: the name each module's file is mapped by. (applied, failed)."""
        applied = failed = 0
        started = time.perf_counter()
        with holding(pid, held) as proc:
            for module, patches in work:
                name = names.get(module.inode, module.name)
                for patch in patches:
                    try:
                        outcome = apply_held(named_for(patch, name), proc, modules=self.modules)
                    except AlreadyApplied:
                        continue
                    except MicropatchError as e:
                        failed += 1
                        self.failed(pid, module, patch, info, when, e)
                        continue
                    applied += 1
                    ms = (time.perf_counter() - started) * 1e3
                    self.applied(pid, module, patch, info, when, outcome.sites, ms)
        return applied, failed

    def live(
        self, pid: int, info: ProcessInfo, work: Work, when: str, names: dict[tuple[int, int], str]
    ) -> tuple[int, int]:
        """Apply to a running process (its own stop); (applied, failed)."""
        applied = failed = 0
        for module, patches in work:
            name = names.get(module.inode, module.name)
            for patch in patches:
                started = time.perf_counter()
                try:
                    outcome = apply(named_for(patch, name), pid, modules=self.modules)
                except AlreadyApplied:
                    continue
                except MicropatchError as e:
                    failed += 1
                    self.failed(pid, module, patch, info, when, e)
                    continue
                applied += 1
                ms = (time.perf_counter() - started) * 1e3
                self.applied(pid, module, patch, info, when, outcome.sites, ms)
        return applied, failed

    def applied(
        self, pid: int, module: ModuleFile, patch: Admitted, info: ProcessInfo, when: str,
        sites: int, ms: float,
    ) -> None:  # fmt: skip
        self.event(
            "applied", pid, module, patch=patch, exe=info.exe,
            message=f"applied {patch.id} v{patch.version} to {module.name} in pid {pid} "
            f"({info.exe}) at its {when}, before any of its code ran"
            if when not in ("late", "running") else
            f"applied {patch.id} v{patch.version} to {module.name} in pid {pid} ({info.exe}), "
            + ("late" if when == "late" else "running"),
            data={"when": when, "sites": sites, "ms": round(ms, 3)},
        )  # fmt: skip

    def failed(
        self, pid: int, module: ModuleFile, patch: Admitted, info: ProcessInfo, when: str,
        e: MicropatchError,
    ) -> None:  # fmt: skip
        self.event(
            "failed", pid, module, patch=patch, exe=info.exe, message=str(e),
            data={"when": when, **e.fields()},
        )  # fmt: skip

    def event(
        self,
        kind: str,
        pid: int,
        module: ModuleFile | None,
        *,
        patch: Admitted | None = None,
        exe: str | None = None,
        message: str = "",
        data: dict[str, object] | None = None,
    ) -> None:
        try:
            self.report(
                Event(
                    kind,
                    time.time(),
                    pid=pid,
                    exe=exe,
                    patch_id=patch.id if patch else None,
                    version=patch.version if patch else None,
                    module=module.name if module else None,
                    message=message,
                    data=data or {},
                )
            )
        except Exception:
            log.exception("reporting an event failed")
