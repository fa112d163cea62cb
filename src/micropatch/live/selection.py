"""Which processes `apply|remove|update --all` touch, decided without stopping any.

The registries are read as `status` reads them (/proc/PID/maps and
/proc/PID/mem, no ptrace stop), so a process that does not carry the patch is
never paused; the engine then decides again inside its stop, so a registry that
changed since the scan is still handled right (NotApplied, AlreadyApplied).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from micropatch.errors import MicropatchError, ProcessExited, ProcessNotFound
from micropatch.live.states import patched_pids, pids_mapping, status
from micropatch.process.select import Filters, ProcessInfo, read_info


@dataclass(frozen=True)
class Candidate:
    """A process in the scope of `--all`, and the version of the patch
    applied there (None: not applied)."""

    info: ProcessInfo
    applied: int | None

    @property
    def pid(self) -> int:
        return self.info.pid


@dataclass
class Selection:
    """The outcome of a scan: what to touch, what to leave, what vanished meanwhile."""

    targets: list[Candidate] = field(default_factory=list)
    skipped: list[Candidate] = field(default_factory=list)  # in scope, nothing to do
    gone: int = 0  # exited during the scan
    unreadable: list[tuple[int, MicropatchError]] = field(default_factory=list)


def for_apply(module: str, patch_id: str, filters: Filters) -> Selection:
    """Processes that map `module` (by file name; identity is checked on apply)
    and do not carry `patch_id` yet (`update` replaces a version)."""
    return _scan(pids_mapping(module), patch_id, filters, lambda applied: applied is None)


def for_remove(patch_id: str, filters: Filters) -> Selection:
    """Processes that carry `patch_id`, in any version."""
    return _scan(patched_pids(), patch_id, filters, lambda applied: applied is not None)


def for_update(patch_id: str, version: int, filters: Filters) -> Selection:
    """Processes that carry an older version of `patch_id`."""
    return _scan(
        patched_pids(), patch_id, filters, lambda applied: applied is not None and applied < version
    )


def applied_version(pid: int, patch_id: str) -> int | None:
    """The version of `patch_id` applied to `pid`, read without stopping it."""
    for state in status(pid):
        if state.patch_id == patch_id:
            return state.version
    return None


def _scan(
    pids: Iterable[int],
    patch_id: str,
    filters: Filters,
    wanted: Callable[[int | None], bool],
) -> Selection:
    selection = Selection()
    for pid in pids:
        try:
            info = read_info(pid)
            if not filters.matches(info):
                continue
            candidate = Candidate(info, applied_version(pid, patch_id))
        except (ProcessNotFound, ProcessExited):
            selection.gone += 1
            continue
        except MicropatchError as e:
            selection.unreadable.append((pid, e))
            continue
        (selection.targets if wanted(candidate.applied) else selection.skipped).append(candidate)
    return selection
