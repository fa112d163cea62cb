"""Patch sources: the TOML format and the validated model (no compilation here)."""

from micropatch.patch.model import Patch, PatchInfo, Patchlet, Target
from micropatch.patch.source import load_patch, parse_patch

__all__ = ["Patch", "PatchInfo", "Patchlet", "Target", "load_patch", "parse_patch"]
