"""x86-64: decode, plan sites, relocate displaced code, lay out trampolines, the ABI.

Pure functions over bytes and addresses; nothing here touches a process. This
module is the `micropatch.arch.Architecture` for x86-64: the layers above use
it through `micropatch.arch.get("x86_64")`.
"""

from micropatch.arch.x86_64.constants import JUMP_LENGTH, JUMP_REACH, NAME, PAGE_SIZE, RED_ZONE
from micropatch.arch.x86_64.listing import exits, instruction_starts, listing
from micropatch.arch.x86_64.site import Site, plan_site, site_unchecked
from micropatch.arch.x86_64.trampoline import (
    build_trampoline,
    site_jump,
    stack_operands,
    writes_stack,
)

__all__ = [
    "JUMP_LENGTH",
    "JUMP_REACH",
    "NAME",
    "PAGE_SIZE",
    "RED_ZONE",
    "Site",
    "build_trampoline",
    "exits",
    "instruction_starts",
    "listing",
    "plan_site",
    "site_jump",
    "site_unchecked",
    "stack_operands",
    "writes_stack",
]
