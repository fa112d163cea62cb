"""The two jumps every patch writes: a site's `jmp trampoline` and a `jmp rel32`.

Plain arithmetic on bytes, no decoder: what applying a precomputed trampoline
(`template`) needs from the architecture besides the template itself.
"""

from __future__ import annotations

from micropatch.arch.base import Site
from micropatch.arch.x86_64.constants import INT3, JUMP_LENGTH
from micropatch.errors import RelocationError, SiteError

_JMP_REL32 = b"\xe9"


def jump(from_address: int, to_address: int) -> bytes:
    """A 5-byte ``jmp rel32`` placed at ``from_address`` that lands on ``to_address``."""
    displacement = to_address - (from_address + JUMP_LENGTH)
    if not -(2**31) <= displacement < 2**31:
        raise RelocationError(
            f"cannot jump from {from_address:#x} to {to_address:#x}: they are more than "
            "2 GiB apart; the cave must be mapped within 2 GiB of the module"
        )
    return _JMP_REL32 + displacement.to_bytes(4, "little", signed=True)


def site_jump(site: Site, trampoline_address: int) -> bytes:
    """The bytes that replace the site: ``jmp trampoline``, then int3 to its end.

    The int3 padding traps loudly if anything ever lands past the jump.
    """
    if site.length < JUMP_LENGTH:
        raise SiteError(
            f"site {site.address:#x} is {site.length} bytes long, too short for the "
            f"{JUMP_LENGTH}-byte jump; plan it with min_length={JUMP_LENGTH}"
        )
    return jump(site.address, trampoline_address) + INT3 * (site.length - JUMP_LENGTH)
