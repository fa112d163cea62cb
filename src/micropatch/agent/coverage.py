"""What `agent status` says of each patch's reach on this host: the copies of its
module build the index found (paths), or a warning that there is none.

A patch whose module build exists nowhere on the indexed filesystems protects
nothing here; saying so is the difference between "enabled" and "working".
"""

from __future__ import annotations

from typing import Any

from micropatch.agent.store import Stored
from micropatch.patch.view import TargetView
from micropatch.trust.recorded import RecordedTarget


def indexable(stored: Stored) -> TargetView:
    """The patch's target with the build-id its artifact was built against when the
    source pins only the SHA-256: the index's cheap key (the same bytes, the same
    build-id)."""
    target = stored.admitted.patch.target
    artifact = stored.admitted.artifact
    if target.build_id or artifact is None or not artifact.payload.module.build_id:
        return target
    build_id = artifact.payload.module.build_id
    return RecordedTarget(target.module, build_id, target.sha256, target.arch)


def coverage(stored: Stored, new_processes: Any, enabled: bool) -> dict[str, Any]:
    """`copies` (paths; None without the new-process part) and `warning` (None, or
    why nothing here can carry the patch)."""
    if new_processes is None:
        return {"copies": None, "warning": None}
    copies = new_processes.copies_of(indexable(stored))
    indexer = new_processes.indexer
    if copies or not enabled or not indexer.ready.is_set() or indexer.walking:
        return {"copies": copies, "warning": None}  # an index not walked says nothing yet
    target = stored.admitted.patch.target
    build = target.build_id or target.sha256
    return {
        "copies": [],
        "warning": f"no copy of {target.module} (build {build}) on the indexed filesystems: "
        "no process here can map this patch's module, or it lives where the agent does not "
        "look (see the index in `agent status --json`)",
    }
