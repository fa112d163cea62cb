"""Patch sources: the TOML format and its validated model.

Names are imported on first use (`from micropatch.patch import Patch` loads the
model and pydantic; `micropatch.patch.guard` alone does not), so that a command
that only reads guards or a recorded patch does not pay for the models.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

    from micropatch.patch.model import Patch as Patch
    from micropatch.patch.model import PatchInfo as PatchInfo
    from micropatch.patch.model import Patchlet as Patchlet
    from micropatch.patch.model import Target as Target
    from micropatch.patch.source import load_patch as load_patch
    from micropatch.patch.source import parse_patch as parse_patch

_WHERE = {
    "Patch": "model",
    "PatchInfo": "model",
    "Patchlet": "model",
    "Target": "model",
    "load_patch": "source",
    "parse_patch": "source",
}

__all__ = ["Patch", "PatchInfo", "Patchlet", "Target", "load_patch", "parse_patch"]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'micropatch.patch' has no attribute {name!r}")
    return getattr(importlib.import_module(f"micropatch.patch.{module}"), name)
