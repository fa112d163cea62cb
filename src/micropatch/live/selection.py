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
    return scan(pids_mapping(module), filters, _version_of(patch_id), wanted("apply"))


def for_remove(patch_id: str, filters: Filters) -> Selection:
    """Processes that carry `patch_id`, in any version."""
    return scan(patched_pids(), filters, _version_of(patch_id), wanted("remove"))


def for_update(patch_id: str, version: int, filters: Filters) -> Selection:
    """Processes that carry an older version of `patch_id`."""
    return scan(patched_pids(), filters, _version_of(patch_id), wanted("update", version))


def wanted(verb: str, version: int | None = None) -> Callable[[int | None], bool]:
    """Whether `verb` touches a process in scope given the version of the patch
    applied there (None: not applied): apply, if it is not applied; remove, if it
    is, in any version; update, if it is, in a version older than `version`."""
    if verb == "apply":
        return lambda applied: applied is None
    if verb == "remove":
        return lambda applied: applied is not None
    assert verb == "update" and version is not None
    return lambda applied: applied is not None and applied < version


def applied_version(pid: int, patch_id: str) -> int | None:
    """The version of `patch_id` applied to `pid`, read without stopping it."""
    for state in status(pid):
        if state.patch_id == patch_id:
            return state.version
    return None


def _version_of(patch_id: str) -> Callable[[int], int | None]:
    return lambda pid: applied_version(pid, patch_id)


def scan(
    pids: Iterable[int],
    filters: Filters,
    applied: Callable[[int], int | None],
    touches: Callable[[int | None], bool],
    *,
    keep: Callable[[int], bool] | None = None,
) -> Selection:
    """Of `pids`, those `filters` keep (and `keep`, a test of the process itself,
    if given), each with the version of the patch `applied` reads there (None: not
    applied): a target if it `touches` it, else skipped. Any runtime's selection
    for `--all` is made here."""
    selection = Selection()
    for pid in pids:
        try:
            info = read_info(pid)
            if not filters.matches(info) or (keep is not None and not keep(pid)):
                continue
            candidate = Candidate(info, applied(pid))
        except (ProcessNotFound, ProcessExited):
            selection.gone += 1
            continue
        except MicropatchError as e:
            selection.unreadable.append((pid, e))
            continue
        (selection.targets if touches(candidate.applied) else selection.skipped).append(candidate)
    return selection
