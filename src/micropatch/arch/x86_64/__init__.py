"""x86-64: decode, plan sites, relocate displaced code, lay out trampolines, the ABI.

Pure functions over bytes and addresses; nothing here touches a process. This
module is the `micropatch.arch.Architecture` for x86-64: the layers above use
it through `micropatch.arch.get("x86_64")`. Its functions load iced-x86 on
first use, so that importing the constants or the ABI (`process/`) does not.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from micropatch.arch.x86_64.constants import JUMP_LENGTH, JUMP_REACH, NAME, PAGE_SIZE, RED_ZONE

if TYPE_CHECKING:
    from micropatch.arch.x86_64.disasm import instruction_starts as instruction_starts
    from micropatch.arch.x86_64.disasm import listing as listing
    from micropatch.arch.x86_64.jumps import site_jump as site_jump
    from micropatch.arch.x86_64.site import Site as Site
    from micropatch.arch.x86_64.site import plan_site as plan_site
    from micropatch.arch.x86_64.site import site_unchecked as site_unchecked
    from micropatch.arch.x86_64.trampoline import build_trampoline as build_trampoline
    from micropatch.arch.x86_64.trampoline import writes_stack as writes_stack

_WHERE = {
    "instruction_starts": "disasm",
    "listing": "disasm",
    "Site": "site",
    "plan_site": "site",
    "site_unchecked": "site",
    "build_trampoline": "trampoline",
    "site_jump": "jumps",
    "writes_stack": "trampoline",
}

__all__ = [
    "JUMP_LENGTH",
    "JUMP_REACH",
    "NAME",
    "PAGE_SIZE",
    "RED_ZONE",
    "Site",
    "build_trampoline",
    "instruction_starts",
    "listing",
    "plan_site",
    "site_jump",
    "site_unchecked",
    "writes_stack",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'micropatch.arch.x86_64' has no attribute {name!r}")
    return getattr(importlib.import_module(f"micropatch.arch.x86_64.{module}"), name)
