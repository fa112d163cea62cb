"""Architectures behind one seam (see `arch.base`): `get(name)` gives the one a
patch's `[target] arch` names."""

from __future__ import annotations

from micropatch.arch.base import Architecture, Listed, Site, TrampolineLayout
from micropatch.errors import MicropatchError

SUPPORTED = ("x86_64",)


def get(name: str) -> Architecture:
    """The architecture called `name` (as `uname -m` prints it)."""
    if name == "x86_64":
        from micropatch.arch import x86_64

        return x86_64
    raise MicropatchError(
        f"architecture {name!r} is not supported; supported: {', '.join(SUPPORTED)}"
    )


__all__ = ["SUPPORTED", "Architecture", "Listed", "Site", "TrampolineLayout", "get"]
