"""Patch sources: the TOML format, the validated model, patchlet assembly."""

from micropatch.patch.assemble import assemble, references
from micropatch.patch.model import Patch, PatchInfo, Patchlet, Target
from micropatch.patch.source import load_patch, parse_patch

__all__ = [
    "Patch",
    "PatchInfo",
    "Patchlet",
    "Target",
    "assemble",
    "load_patch",
    "parse_patch",
    "references",
]
