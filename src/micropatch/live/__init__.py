"""Transactions on live processes: apply, remove, update, status."""

from micropatch.live.engine import Outcome, apply, remove, update
from micropatch.live.status import PatchState, patched_pids, pids_mapping, status

__all__ = [
    "Outcome",
    "PatchState",
    "apply",
    "patched_pids",
    "pids_mapping",
    "remove",
    "status",
    "update",
]
