"""x86-64 machine code: decode, plan sites, relocate displaced code, build trampolines.

Pure functions over bytes and addresses; nothing here touches a process.
"""

from micropatch.x86.decode import decode, format_instruction
from micropatch.x86.relocate import JUMP_LENGTH, jump, relocate
from micropatch.x86.site import Site, plan_site, site_unchecked
from micropatch.x86.trampoline import RED_ZONE, build_trampoline, site_jump, writes_stack

__all__ = [
    "JUMP_LENGTH",
    "RED_ZONE",
    "Site",
    "build_trampoline",
    "decode",
    "format_instruction",
    "jump",
    "plan_site",
    "relocate",
    "site_jump",
    "site_unchecked",
    "writes_stack",
]
