"""Python-level micropatches of running CPython interpreters (docs/python-patches.md).

`apply`, `update`, `remove`, `repair` (engine.py), `status` (states.py) and
`build` (build.py) are imported on first use, so `status` loads no assembler.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from micropatch.runtimes.cpython.build import build as build
    from micropatch.runtimes.cpython.engine import apply as apply
    from micropatch.runtimes.cpython.engine import remove as remove
    from micropatch.runtimes.cpython.engine import repair as repair
    from micropatch.runtimes.cpython.engine import update as update
    from micropatch.runtimes.cpython.states import patched_pids as patched_pids
    from micropatch.runtimes.cpython.states import status as status

_WHERE = {
    "build": "build",
    "apply": "engine",
    "remove": "engine",
    "repair": "engine",
    "update": "engine",
    "patched_pids": "states",
    "status": "states",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'micropatch.runtimes.cpython' has no attribute {name!r}")
    return getattr(importlib.import_module(f"micropatch.runtimes.cpython.{module}"), name)
