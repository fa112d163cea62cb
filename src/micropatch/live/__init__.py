"""Transactions on live processes: apply, remove, update, status.

Attributes are imported on first use (`live.apply` loads the engine, and with it
the assembler; `live.status` does not), so a command pays only for what it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from micropatch.live.engine import Outcome as Outcome
    from micropatch.live.engine import apply as apply
    from micropatch.live.engine import remove as remove
    from micropatch.live.engine import repair as repair
    from micropatch.live.engine import update as update
    from micropatch.live.states import PatchState as PatchState
    from micropatch.live.states import patched_pids as patched_pids
    from micropatch.live.states import pids_mapping as pids_mapping
    from micropatch.live.states import status as status

_WHERE = {
    "Outcome": "engine",
    "apply": "engine",
    "remove": "engine",
    "repair": "engine",
    "update": "engine",
    "PatchState": "states",
    "patched_pids": "states",
    "pids_mapping": "states",
    "status": "states",
}

__all__ = [
    "Outcome",
    "PatchState",
    "apply",
    "patched_pids",
    "pids_mapping",
    "remove",
    "repair",
    "status",
    "update",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'micropatch.live' has no attribute {name!r}")
    return getattr(importlib.import_module(f"micropatch.live.{module}"), name)
